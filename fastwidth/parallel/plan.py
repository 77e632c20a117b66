"""`fastwidth plan`: per-rank memory of a config under every backend, and the widest GPT that fits.

    fastwidth plan --config configs/dist/gpt_16k_8gpu.yaml --set dist.world_size=8

Bytes per rank (P parameters, W ranks, Adam 8 B/param of state, SGD 4 with momentum):
    params     fp32 4P; sharded (fsdp2, ZeRO-3) 4P/W; offload_params: host
    grads      4P; sharded from ZeRO-2 / fsdp2: 4P/W; ddp adds its bucket copy (+4P)
    optimizer  8P; sharded from ZeRO-1 / fsdp2: 8P/W; offload_optimizer: host
    buffers    gathered working set of sharded backends: root unit + 2 blocks (prefetch) in the
               compute dtype, + one block's unsharded grads; bf16 adds a 2 B/param compute copy
    activations per GPT block B·T·(16N + 2·H·T) values saved for backward, + 2·B·T·V logits;
               MLP 3·B·N per layer; B is the rank's share of data.batch_size
Measured against CPU peak memory in tests/parallel/test_plan.py (the note quotes the error).
"""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

from fastwidth.config import Config, for_width
from fastwidth.errors import ConfigError

GIB = 1 << 30


def _io(cfg: Config):
    d = cfg.data
    if cfg.model.arch == "gpt":
        vocab = 256 if d.tokenizer == "bytes" else d.bpe_vocab_size
        return SimpleNamespace(kind="tokens", vocab_size=vocab, seq_len=d.seq_len, in_shape=None, num_classes=None)
    if d.source == "synthetic":
        return SimpleNamespace(kind="classes", vocab_size=None, seq_len=d.seq_len, in_shape=(d.in_dim,),
                               num_classes=d.num_classes)
    from fastwidth.data import build_stream
    from fastwidth.train.loop import data_io
    return data_io(build_stream(d), cfg)


def count_params(cfg: Config) -> dict:
    """Exact counts from the model built on meta: total, root unit, largest block."""
    from fastwidth.parallel.engines import shard_units
    from fastwidth.models import build_meta
    model = build_meta(cfg, _io(cfg))
    total = sum(p.numel() for p in model.parameters())
    units = [sum(p.numel() for p in u.parameters()) for u in shard_units(model)]
    return {"total": total, "root": total - sum(units), "block": max(units, default=0),
            "heads": (cfg.model.n_heads or cfg.model.width // cfg.model.head_dim) if cfg.model.arch == "gpt" else 0,
            "vocab": getattr(_io(cfg), "vocab_size", None)}


def activation_values(cfg: Config, counts: dict, local_batch: int) -> float:
    m, n = cfg.model, cfg.model.width
    if m.arch == "gpt":
        t, h, v = cfg.data.seq_len, counts["heads"], counts["vocab"]
        return local_batch * t * (m.depth * (16 * n + 2 * h * t) + 2 * v)
    if m.arch == "mlp":
        return local_batch * (m.depth * 3 * n + 2 * cfg.data.num_classes)
    return local_batch * 16 * n * m.depth * 32 * 32  # resnet: rough, 32x32 feature maps


def plan_memory(cfg: Config, backend: str, world: int, stage: int = 0, offload_opt: bool = False,
                offload_params: bool = False, bf16: bool = False, counts: dict | None = None) -> dict:
    """Bytes per rank on the device (and in host memory for offloaded state)."""
    c = counts or count_params(cfg)
    p = c["total"]
    sharded = backend == "fsdp2" or (backend == "deepspeed" and stage == 3)
    opt_b = {"sgd": 4 if cfg.optim.momentum else 0}.get(cfg.optim.name, 8)
    shard_opt = backend == "fsdp2" or (backend == "deepspeed" and stage >= 1)
    shard_grad = backend == "fsdp2" or (backend == "deepspeed" and stage >= 2)
    out = {"params": 4 * p / (world if sharded else 1),
           "grads": 4 * p / (world if shard_grad else 1),
           "optimizer": opt_b * p / (world if shard_opt else 1)}
    host = 0.0
    if offload_params and sharded:
        host += out["params"]
        out["params"] = 0.0
    if offload_opt and backend == "deepspeed":
        host += out["optimizer"] + out["grads"]  # fp32 grads are copied out for the CPU step
        out["optimizer"] = 0.0
    cbytes = 2 if bf16 else 4
    buffers = 4 * p if backend == "ddp" else 0.0  # DDP's gradient buckets
    if sharded:
        buffers += cbytes * (c["root"] + 2 * c["block"]) + 4 * c["block"]
    if bf16 and not sharded:
        buffers += 2 * p
    out["buffers"] = buffers
    out["activations"] = cbytes * activation_values(cfg, c, cfg.data.batch_size // world)
    out["total"] = sum(out[k] for k in ("params", "grads", "optimizer", "buffers", "activations"))
    out["host"] = host
    return out


CHOICES = [("none", 0, False, False), ("ddp", 0, False, False), ("fsdp2", 0, False, False),
           ("fsdp2", 0, False, True), ("deepspeed", 1, False, False), ("deepspeed", 2, False, False),
           ("deepspeed", 2, True, False), ("deepspeed", 3, False, False), ("deepspeed", 3, True, False),
           ("deepspeed", 3, True, True)]


def label(backend, stage, off_opt, off_par) -> str:
    s = backend if backend != "deepspeed" else f"zero{stage}"
    return s + (" +opt-offload" if off_opt else "") + (" +param-offload" if off_par else "")


def widest_gpt(cfg: Config, choice: tuple, world: int, budget: float, step: int = 0) -> int:
    """The widest GPT (multiple of the head size, doubling then bisecting) whose plan fits `budget` bytes."""
    step = step or (cfg.model.n_heads * 2 if cfg.model.n_heads else cfg.model.head_dim)
    backend, stage, oo, op = choice
    w = 1 if backend == "none" else world
    bf16 = cfg.dist.mixed_precision == "bf16"

    def fits(width):
        wc = for_width(cfg, width)
        return plan_memory(wc, backend, w, stage, oo, op, bf16)["total"] <= budget

    lo, hi = 0, step
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 22:
            return lo
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def cmd_plan(args) -> int:
    from fastwidth.cli import overrides_of
    from fastwidth.config import load_config
    cfg = load_config(args.config, overrides_of(args))
    world = cfg.dist.world_size or 1
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} is not divisible by dist.world_size={world}")
    counts = count_params(cfg)
    bf16 = cfg.dist.mixed_precision == "bf16"
    budget = cfg.dist.gpu_memory_gb * 1e9
    print(f"{cfg.model.arch} width {cfg.model.width} depth {cfg.model.depth}: {counts['total'] / 1e6:.1f} M parameters; "
          f"{world} ranks, global batch {cfg.data.batch_size}, {'bf16' if bf16 else 'fp32'}, "
          f"{cfg.dist.gpu_memory_gb:g} GB per GPU; GiB per rank:")
    cols = ("params", "grads", "optimizer", "activations", "buffers", "total", "host")
    print(f"{'backend':34s}" + "".join(f"{c:>12s}" for c in cols) + f"{'fits':>6s}{'widest GPT':>12s}")
    for choice in CHOICES:
        backend, stage, oo, op = choice
        w = 1 if backend == "none" else world
        mem = plan_memory(cfg, backend, w, stage, oo, op, bf16, counts)
        widest = widest_gpt(cfg, choice, world, budget) if cfg.model.arch == "gpt" else 0
        print(f"{label(*choice):34s}" + "".join(f"{mem[c] / GIB:12.2f}" for c in cols)
              + f"{'yes' if mem['total'] <= budget else 'no':>6s}{widest:>12d}")
    return 0


def add_parser(sub) -> None:
    from fastwidth.cli import add_config_args
    p = sub.add_parser("plan", help="per-rank memory for every backend / ZeRO stage / offload, and the widest GPT that fits")
    add_config_args(p)
    p.set_defaults(func=cmd_plan)
