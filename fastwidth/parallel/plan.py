"""`fastwidth plan`: per-rank memory of a sweep under every backend, and the widest GPT that fits.

    fastwidth plan --config configs/dist/gpt_16k_8gpu.yaml --set dist.world_size=8

Per member and phase, bytes per rank (P parameters, W ranks, L the largest tensor, K the largest
block, R the root unit's parameters, c the compute dtype's bytes; Adam holds 8 B/param of state).
Under HSDP (fsdp2 with dist.replicate) every /W below is /S, S the ranks of one shard group:
W / dist.replicate, or the ranks of one node for dist.replicate=-1 (shard_group); the batch is
still split over all W ranks, so the activations keep W.
    built   params 4P (ddp, ZeRO-1/2) or 4P/W (fsdp2, ZeRO-3), plus the init temporaries: 8L
            (ZeRO-3: the layer being built is allocated whole and broadcast before partitioning)
    ready   + DDP's gradient buckets 4P; DeepSpeed: fp32 master partition 4P/W and the Adam state
            8P/W it initializes in deepspeed.initialize (stage_1_and_2.py / stage3.py,
            initialize_optimizer_states), ZeRO-1/2 a transient flat copy of the parameters 4P
    step    persistent: + optimizer state (torch: 8P or 8P/W, created by step 1; DeepSpeed's
            gradient partitions 4P/W); transient while one member steps: gradients (4P, or 4P/W
            sharded), activations, the gathered working set of sharded engines ((R + 2K)·c,
            + one block's unsharded gradient 4K), DeepSpeed's reduce buckets, FSDP2's foreach Adam
            temporaries (8P/W) and ZeRO's flattened fp32 gradient (4P/W)
    eval    persistent + the probe forward's activations at stats.eval_batch, + the kernel rows the
            feature hooks keep (4·layers·kp·(N + kp), kp = stats.kernel_points), or the statistics
            of one whole member (sharpness, eNTK, coord: whole_member_bytes, the gathered view of
            Engine.gathered + the eigensolver's vectors), one member at a time
A sweep is every member built (sum of built), then every member ready (sum), then one member at a
time steps or evaluates on top of every member's persistent state (with sweep.stack in one process,
all members of a width step together: their step transients add up); the peak per rank is
    max(sum built, sum ready, sum persistent + max transient(step), sum persistent + max eval).
Checked against the memory rows of 2-rank CPU runs (tests/parallel/test_memory.py) for ddp,
fsdp2 and ZeRO 1-3, and of a 4-rank HSDP run (2 replica groups of 2); the note quotes the error.
Offloaded state moves to "host".
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from fastwidth.config import Config, for_width
from fastwidth.errors import ConfigError
from fastwidth.run.members import member_config, member_specs

GIB = 1 << 30
# Host memory FSDP2 holds from its first fully_shard / to_empty on (DTensor dispatch and FSDP
# state, not proportional to the model): 64-70 MiB per rank measured on 2 CPU ranks (torch 2.13).
FSDP2_CPU_RUNTIME = 64 * (1 << 20)


def micro_steps(cfg, world_size: int) -> int:
    """data.batch_size / (ranks × data.micro_batch_size); 1 without micro-batching."""
    b, m = cfg.data.batch_size, cfg.data.micro_batch_size
    local = b // max(world_size, 1)
    if not m or m == local:
        return 1
    if local % m:
        raise ConfigError(f"data.micro_batch_size {m} does not divide the per-rank batch {local} "
                          f"(data.batch_size {b} over {world_size} ranks); pick a divisor of {local}")
    return local // m


def _io(cfg: Config):
    d = cfg.data
    if cfg.model.arch == "gpt":
        vocab = 256 if d.tokenizer == "bytes" else d.bpe_vocab_size
        return SimpleNamespace(kind="tokens", vocab_size=vocab, seq_len=d.seq_len, in_shape=None, num_classes=None)
    if d.source == "synthetic":
        return SimpleNamespace(kind="classes", vocab_size=None, seq_len=d.seq_len, in_shape=(d.in_dim,),
                               num_classes=d.num_classes)
    from fastwidth.data import build_stream, data_io
    return data_io(build_stream(d), cfg)


def count_params(cfg: Config) -> dict:
    """Exact counts from the model built on meta: total, root unit, largest block, largest tensor."""
    from fastwidth.models import build_meta
    from fastwidth.parallel.engines import shard_units
    io = _io(cfg)  # for a data source other than synthetic, this builds its stream: once
    model = build_meta(cfg, io)
    total = sum(p.numel() for p in model.parameters())
    units = [sum(p.numel() for p in u.parameters()) for u in shard_units(model)]
    counts = {"total": total, "root": total - sum(units), "block": max(units, default=0),
              "tensor": max((p.numel() for p in model.parameters()), default=0),
              "heads": (cfg.model.n_heads or cfg.model.width // cfg.model.head_dim) if cfg.model.arch == "gpt" else 0,
              "vocab": getattr(io, "vocab_size", None), "feature_layers": len(model.feature_points())}
    if cfg.model.arch in ("python", "hf"):  # a user's model: its saved activations measured, not a formula
        counts.update(act_row=saved_values_per_row(model, io), units=len(units),
                      row_len=io.seq_len if io.kind == "tokens" else 1)
    return counts


def saved_values_per_row(model, io) -> float:
    """Values autograd saves for backward per example (sequence) of a training forward + loss, counted
    on the meta model (no memory), each saved tensor once: the count at 2 examples minus the count at
    1, so parameters saved as they are (a matmul's weight) cancel. Under FakeTensorMode, where
    transformers' mask code skips its data-dependent checks (.item(), which meta cannot give)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    def count(b: int) -> int:
        seen = {}                    # one tensor saved by two ops (a ReLU's output, the next matmul's input) once

        def pack(t):
            seen[id(t)] = t
            return t
        shape = (b, io.seq_len) if io.kind == "tokens" else (b, *io.in_shape)
        x = torch.zeros(shape, dtype=torch.long if io.kind == "tokens" else torch.float32, device="meta")
        y = torch.zeros(shape if io.kind == "tokens" else (b,), dtype=torch.long, device="meta")
        with FakeTensorMode(allow_non_fake_inputs=True), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.enable_grad():
            model.loss(x, y)
        return sum(t.numel() for t in seen.values())
    return float(count(2) - count(1))


def activation_values(cfg: Config, counts: dict, rows: int) -> float:
    """Values saved for backward by one forward of `rows` examples (sequences for the GPT).
    GPT block: B·T·(16N + 2·H·T), logits 2·B·T·V; MLP 3·B·N per layer. Under
    train.activation_checkpointing=block only each block's input (B·T·N) stays, plus one block's
    full set while it is recomputed."""
    m, n = cfg.model, cfg.model.width
    if "act_row" in counts:  # a user's model: measured; checkpointing keeps each unit's input + one unit's set
        if cfg.train.activation_checkpointing == "block" and counts["units"]:
            return rows * (counts["units"] * counts["row_len"] * n + counts["act_row"] / counts["units"])
        return rows * counts["act_row"]
    if m.arch == "gpt":
        t, h, v = cfg.data.seq_len, counts["heads"], counts["vocab"]
        block, inp, head = rows * t * (16 * n + 2 * h * t), rows * t * n, 2 * rows * t * v
    elif m.arch == "mlp":
        block, inp, head = rows * 3 * n, rows * n, 2 * rows * cfg.data.num_classes
    else:  # resnet: rough, 32x32 feature maps
        block, inp, head = rows * 16 * n * 32 * 32, rows * n * 32 * 32, 0
    if cfg.train.activation_checkpointing == "block":
        return m.depth * inp + block + head
    return m.depth * block + head


def kernel_rows_bytes(cfg: Config, counts: dict) -> float:
    """What the evaluation hooks keep until the probe's feature kernels are formed (KernelRows in
    fastwidth/stats/signature.py): per feature layer the kernel points' fp32 rows, kernel_points x N
    (ResNet: the whole N x 32 x 32 map), and the (kernel_points, kernel_points) kernel.
    128 points, width 16384, 48 feature layers: 0.4 GB."""
    kp = min(cfg.stats.kernel_points, cfg.data.probe_size * counts.get("row_len", cfg.data.seq_len if cfg.model.arch == "gpt" else 1))
    if not cfg.stats.enabled or kp <= 0:
        return 0.0
    row = cfg.model.width * (32 * 32 if cfg.model.arch == "resnet" else 1)
    return 4.0 * counts.get("feature_layers", cfg.model.depth) * (kp * row + kp * kp)


@dataclass(frozen=True)
class Choice:
    backend: str = "none"           # none | ddp | fsdp2 | deepspeed
    stage: int = 0
    offload_opt: bool = False
    offload_params: bool = False

    @property
    def sharded(self) -> bool:
        return self.backend == "fsdp2" or (self.backend == "deepspeed" and self.stage == 3)

    @property
    def label(self) -> str:
        s = self.backend if self.backend != "deepspeed" else f"zero{self.stage}"
        return s + (" +opt-offload" if self.offload_opt else "") + (" +param-offload" if self.offload_params else "")


def phase_peaks(plan: dict) -> dict:
    """The running peak at each memory row's phase (ru_maxrss never goes down)."""
    built = plan["built"]
    ready = max(built, plan["ready"])
    return {"built": built, "ready": ready, "step": max(ready, plan["step"])}


def choice_of(cfg: Config) -> Choice:
    d = cfg.dist
    return Choice(d.backend, d.zero_stage if d.backend == "deepspeed" else 0, d.offload_optimizer, d.offload_params)


def shard_group(cfg: Config, world: int, node_size: int | None = None) -> int:
    """Ranks one fsdp2 shard group spans at `world` ranks: every rank, or under HSDP
    world / dist.replicate, or for dist.replicate=-1 the ranks of one node (node_size; None: one
    node holds every rank, as hsdp_layout in nodes.py makes it on one host)."""
    r = cfg.dist.replicate
    if r > 1:
        if world % r:
            raise ConfigError(f"dist.replicate={r} needs a rank count divisible by it, got {world} ranks")
        return world // r
    if r == -1 and node_size is not None:
        if node_size < 1 or node_size > world or world % node_size:
            raise ConfigError(f"dist.replicate=-1 needs the ranks per node ({node_size}) to divide the "
                              f"{world} ranks; pick a divisor of {world}")
        return node_size
    return world


def member_plan(cfg: Config, choice: Choice, world: int, counts: dict | None = None, k: int = 1,
                cpu: bool = False, shard: int | None = None) -> dict:
    """One member's bytes per rank: built, ready, persistent, step (transient), eval (transient), host.
    cpu: the "device" is host memory (adds the runtime state that lives in host memory).
    shard: ranks of one fsdp2 shard group under HSDP (shard_group); None: every rank. Sharded
    parameters, gradients, optimizer state and init temporaries divide by it; the batch by world."""
    from fastwidth.parallel.zero import bucket_elements
    c = counts or count_params(cfg)
    p, big, blk, root = c["total"], c["tensor"], c["block"], c["root"]
    w = world if choice.backend != "none" else 1
    s = shard if shard and choice.backend == "fsdp2" else w   # what the sharded terms divide by
    cb = 2 if cfg.dist.mixed_precision == "bf16" or cfg.train.precision == "bf16" else 4
    opt_b = {"sgd": 4 if cfg.optim.momentum else 0}.get(cfg.optim.name, 8)
    ds, sharded = choice.backend == "deepspeed", choice.sharded
    # DeepSpeed keeps its partitions in the compute dtype (bf16) beside an fp32 master; the others fp32
    held = (cb if ds and cfg.dist.mixed_precision == "bf16" else 4) * p / (s if sharded else 1)
    host = 0.0
    if choice.offload_params and sharded:
        host, held = host + held, 0.0
    built = held + 12 * big / (s if choice.backend == "fsdp2" else 1)   # init: blocks, cat, scaled copy
    persistent, ready_extra = held, 0.0
    if choice.backend == "ddp":
        persistent += 4 * p                                   # gradient buckets
    opt_state = opt_b * p / (s if (sharded or (ds and choice.stage >= 1)) else 1)
    master = 4 * p / w if ds else 0.0                         # fp32 master partition (DeepSpeed, every stage)
    if ds and choice.offload_opt:
        host, opt_state, master = host + opt_state + master + 4 * p / w, 0.0, 0.0
    persistent += master
    if ds and choice.stage == 3:
        persistent += opt_state                               # stage3.py initializes the state at initialize
    if ds and choice.stage < 3:
        ready_extra = 4 * p                                   # flattening the parameters into one buffer
    ready = persistent + ready_extra + (FSDP2_CPU_RUNTIME if choice.backend == "fsdp2" and cpu else 0.0)
    # ZeRO-1 keeps only its partition of the averaged gradients, as ZeRO-2 (equal peaks measured, 0.19.8)
    grads = 4 * p / (s if (sharded or (ds and choice.stage >= 1)) else 1)
    rows = cfg.data.batch_size // max(w, 1) // max(k, 1)
    act = cb * activation_values(cfg, c, rows)
    transient = grads + act
    if not (ds and choice.stage == 3):
        persistent += opt_state                               # torch creates it at step 1
    if ds:
        persistent += grads                                   # gradient partitions
        transient = 4 * p / w + act                           # + the flattened fp32 gradient
        transient += 4 * 2 * bucket_elements(blk)             # reduce buckets (overlap_comm: two)
    if sharded:
        transient += cb * (root + 2 * blk) + 4 * blk
    if choice.backend == "fsdp2" and cpu:
        built += FSDP2_CPU_RUNTIME                            # held from the first fully_shard on
    # evaluation: the probe forward in stats.eval_batch rows without grad: one block's values live
    # at a time (in fp32: the probe runs fp32) and the fp32 logits
    eval_rows = min(cfg.stats.eval_batch, cfg.data.probe_size) if cfg.stats.enabled else 0
    ev = 4 * activation_values(cfg, c, eval_rows) / max(cfg.model.depth, 1) if eval_rows else 0.0
    if sharded:
        ev += cb * (root + 2 * blk)
    ev += kernel_rows_bytes(cfg, c)
    whole, kept = whole_member_bytes(cfg, choice, p, c, rows)
    ev = max(ev, whole)
    persistent += kept
    return {"built": built, "ready": ready, "persistent": persistent, "step": transient, "eval": ev, "host": host,
            "params": held, "grads": grads, "optimizer": opt_state + master, "activations": act}


def whole_member_bytes(cfg: Config, choice: Choice, p: int, counts: dict, rows: int) -> tuple[float, float]:
    """(transient, persistent) bytes per rank of the statistics that need one member whole, which
    run on Engine.gathered (parallel/engines.py), one member at a time:
      gathered view   4P parameters where the engine shards them (FSDP2 / ZeRO-3 build a replica, one
                      tensor in flight) + 4P of Adam's v̂ where the live state is not a whole torch
                      tensor already (FSDP2, DeepSpeed: gathered)
      sharpness       Lanczos (stats/sharpness.py, both rows): 6 vectors of P fp32 (P, its root,
                      P^½q, Hq, w, double backward's gradient) + a basis of the iterations, + 3x
                      the activations of the batch rows: the evaluation rows' stats.sharpness_iters
                      on stats.sharpness_points of this rank's share, batch_sharpness's
                      stats.batch_sharpness_iters on all of it
      eNTK            stats.ntk_max_mb of stacked gradients + one gradient 4P
      coord           W_0 of every layer, 4P per member, kept from init (persistent)"""
    sc = cfg.stats
    if not sc.enabled:
        return 0.0, 0.0
    sharded, adam = choice.sharded, cfg.optim.name in ("adam", "adamw")
    gathered = 4 * p * sharded + 4 * p * (adam and choice.backend in ("fsdp2", "deepspeed"))
    per_seq = counts.get("row_len", cfg.data.seq_len if cfg.model.arch == "gpt" else 1)
    out = 0.0
    if sc.sharpness_iters:
        n = min(max(1, -(-sc.sharpness_points // per_seq)), max(rows, 1))
        out = max(out, (6 + sc.sharpness_iters) * 4 * p + 3 * 4 * activation_values(cfg, counts, n))
    if sc.batch_sharpness_every or sc.batch_sharpness_dense:
        out = max(out, (6 + sc.batch_sharpness_iters) * 4 * p + 3 * 4 * activation_values(cfg, counts, max(rows, 1)))
    if sc.ntk_points:
        out = max(out, (sc.ntk_max_mb << 20) + 4 * p)
    if sc.coord_every:
        out = max(out, 4 * p * sharded)       # the replica each measurement reads
    return (gathered + out if out else 0.0), (4 * p if sc.coord_every else 0.0)


def sweep_members(cfg: Config) -> list[tuple[int, int | None]]:
    """(width, depth) of every member (run/members.py): one per learning rate of sweep.lrs and
    seed too; depth None outside a depth sweep (the model's configured depth)."""
    return [(m.width, m.depth) for m in member_specs(cfg)]


def plan_sweep(cfg: Config, world: int, choice: Choice | None = None, k: int = 1,
               node_size: int | None = None) -> dict:
    """Peak bytes per rank of the whole sweep (placement per width: dist.shard_min_width; fsdp2
    members shard over shard_group(cfg, world, node_size) ranks)."""
    choice = choice or choice_of(cfg)
    shard = shard_group(cfg, world, node_size) if choice.backend == "fsdp2" else None
    plans, counted = [], {}
    for w, d in sweep_members(cfg):
        ch = choice
        if cfg.dist.shard_min_width and w < cfg.dist.shard_min_width and choice.backend != "none":
            ch = Choice("ddp")
        if (w, d, ch) not in counted:
            wc = member_config(cfg, w, None, d)   # its width and, in a depth sweep, its depth
            counted[(w, d, ch)] = member_plan(wc, ch, world, count_params(wc), k, shard=shard)
        plans.append(counted[(w, d, ch)])
    total = {key: sum(pl[key] for pl in plans) for key in ("built", "ready", "persistent", "host", "params",
                                                           "grads", "optimizer")}
    # sweep.stack: a width's members step together (models/stacked.py), so their gradients and
    # activations are live at once: the transient is the largest width's sum, not one member's
    from fastwidth.models.stacked import refusal as stack_refusal
    steps, acts = {}, {}
    for (w, d), pl in zip(sweep_members(cfg), plans):  # a width's members of one depth stack together
        key = (w, d) if choice.backend == "none" and stack_refusal(cfg) is None else (w, d, len(steps))
        steps[key] = steps.get(key, 0.0) + pl["step"]
        acts[key] = acts.get(key, 0.0) + pl["activations"]
    total["step"] = total["persistent"] + max(steps.values())
    total["eval"] = total["persistent"] + max(pl["eval"] for pl in plans)
    total["activations"] = max(acts.values())
    total["peak"] = max(total["built"], total["ready"], total["step"], total["eval"])
    total["members"] = len(plans)
    return total


def plan_memory(cfg: Config, backend: str, world: int, stage: int = 0, offload_opt: bool = False,
                offload_params: bool = False, counts: dict | None = None, node_size: int | None = None) -> dict:
    """One model's plan (cfg.model.width) under one choice; "total" is its peak per rank."""
    shard = shard_group(cfg, world, node_size) if backend == "fsdp2" else None
    m = member_plan(cfg, Choice(backend, stage, offload_opt, offload_params), world, counts, shard=shard)
    return {**m, "total": max(m["built"], m["ready"], m["persistent"] + m["step"], m["persistent"] + m["eval"])}


CHOICES = [Choice("none"), Choice("ddp"), Choice("fsdp2"), Choice("fsdp2", offload_params=True),
           Choice("deepspeed", 1), Choice("deepspeed", 2), Choice("deepspeed", 2, True),
           Choice("deepspeed", 3), Choice("deepspeed", 3, True), Choice("deepspeed", 3, True, True)]


def widest_gpt(cfg: Config, choice: Choice, world: int, budget: float, step: int = 0,
               node_size: int | None = None) -> int:
    """The widest GPT (multiple of the head size, doubling then bisecting) whose plan fits `budget` bytes."""
    step = step or (cfg.model.n_heads * 2 if cfg.model.n_heads else cfg.model.head_dim)

    def fits(width):
        return plan_memory(for_width(cfg, width), choice.backend, world, choice.stage, choice.offload_opt,
                           choice.offload_params, node_size=node_size)["total"] <= budget

    lo, hi = 0, step
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 22:
            return lo
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def device_budget(cfg: Config, env) -> tuple[float, str]:
    """Bytes one rank may use: the GPU's memory, or the host's shared by the ranks on this node."""
    import os
    import torch
    if env.device.type == "cuda":
        return float(torch.cuda.get_device_properties(env.device).total_memory), f"GPU {env.device}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total / max(local, 1), f"host memory / {local} local ranks"


def check_fits(cfg: Config, env, k: int = 1) -> None:
    """Refuse, in one line, a sweep the planner says will not fit (dist.ignore_plan=true overrides)."""
    if cfg.dist.ignore_plan:
        return
    node = ranks_per_node(env) if cfg.dist.backend == "fsdp2" and cfg.dist.replicate == -1 else None
    plan = plan_sweep(cfg, env.world_size, k=k, node_size=node)
    budget, where = device_budget(cfg, env)
    if plan["peak"] > budget:
        shard = shard_group(cfg, env.world_size, node) if cfg.dist.backend == "fsdp2" else env.world_size
        groups = f", shard groups of {shard}" if shard != env.world_size else ""
        raise ConfigError(f"the planner puts this sweep's peak at {plan['peak'] / GIB:.1f} GiB per rank, more than "
                          f"the {budget / GIB:.1f} GiB of the {where} ({choice_of(cfg).label}, {env.world_size} ranks"
                          f"{groups}); see `fastwidth plan`, or set dist.ignore_plan=true to start anyway")


def ranks_per_node(env) -> int:
    """Ranks on each node, as the HSDP mesh counts them (nodes.hsdp_layout: one row per node for
    dist.replicate=-1; it refuses nodes of unequal size). Collective under a process group."""
    from fastwidth.parallel.nodes import hsdp_layout, node_keys
    return len(hsdp_layout(node_keys(env), -1)[0])
