"""`fastwidth plan`: the planner's table (fastwidth/parallel/plan.py) for every backend, and the dry run.

    fastwidth plan --config configs/dist/gpt_16k_8gpu.yaml --set dist.world_size=8 [--dry-run --ranks 8 64]
    fastwidth plan --config ... --set dist.world_size=16 dist.replicate=-1 --ranks-per-node 8   # HSDP per node
"""
from __future__ import annotations

import os

from fastwidth.config_args import add_config_args, overrides_of
from fastwidth.errors import ConfigError
from fastwidth.parallel.plan import CHOICES, GIB, count_params, micro_steps, plan_sweep, shard_group, widest_gpt


def node_size_of(args) -> tuple[int | None, str]:
    """Ranks per node for dist.replicate=-1: --ranks-per-node, else the launcher's LOCAL_WORLD_SIZE,
    else one node holding every rank (None); and where it came from."""
    given = getattr(args, "ranks_per_node", None)
    if given is not None:
        if given < 1:
            raise ConfigError(f"--ranks-per-node must be at least 1, got {given}")
        return given, "--ranks-per-node"
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local:
        if not local.isdigit() or int(local) < 1:
            raise ConfigError(f"LOCAL_WORLD_SIZE={local!r} is not a rank count; pass --ranks-per-node")
        return int(local), "LOCAL_WORLD_SIZE"
    return None, "one node assumed; --ranks-per-node to change"


def shard_note(cfg, world: int, node: int | None, source: str) -> str:
    """Which shard-group size the fsdp2 rows assume."""
    shard, r = shard_group(cfg, world, node), cfg.dist.replicate
    if r > 1:
        return f"fsdp2 rows: HSDP, {r} replica groups, shards over {shard} of {world} ranks"
    if r == -1:
        return f"fsdp2 rows: HSDP, one replica group per node of {shard} ranks ({source}), shards over {shard} of {world} ranks"
    return f"fsdp2 rows: shards over all {world} ranks"


def gib_text(nbytes: float) -> str:
    """Bytes as GiB for the table: two decimals, or three significant digits past 10^5 GiB."""
    gib = nbytes / GIB
    return f"{gib:.2f}" if gib < 1e5 else f"{gib:.3g}"


def count_text(n: float) -> str:
    """A parameter count in the largest unit that keeps it readable: 12.6 M, 28.8 T."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f}"


def table_lines(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as text lines: the first column left-aligned, the others right-aligned, each
    column as wide as its widest cell, so values of any size stay apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [f"{r[0]:<{widths[0]}}" + "".join(f"  {c:>{w}}" for c, w in zip(r[1:], widths[1:])) for r in rows]


def cmd_plan(args) -> int:
    from fastwidth.config import load_config, resolve
    cfg = resolve(load_config(args.config, overrides_of(args)))
    world = cfg.dist.world_size or 1
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} is not divisible by dist.world_size={world}")
    k = micro_steps(cfg, world)
    try:
        counts = count_params(cfg)
    except RuntimeError as e:  # torch's meta tensors: a weight past 2^63 bytes (width ~1.5e9 in fp32)
        if "overflow" not in str(e):
            raise
        raise ConfigError(f"model.width={cfg.model.width} (sweep.widths {cfg.sweep.widths}) is too wide to plan: "
                          f"a weight matrix of that width overflows torch's 64-bit storage size") from None
    budget = cfg.dist.gpu_memory_gb * 1e9
    node, source = node_size_of(args)
    note = shard_note(cfg, world, node, source)   # before the table: a bad dist.replicate stops here
    depths = f"depths {cfg.sweep.depths}" if cfg.sweep.depths else f"depth {cfg.model.depth}"
    print(f"{cfg.model.arch} widths {cfg.sweep.widths} x {depths} x seeds {cfg.sweep.seeds}: widest "
          f"{count_text(counts['total'])} parameters; {world} ranks, global batch {cfg.data.batch_size} "
          f"({k} micro-batches), checkpointing {cfg.train.activation_checkpointing}, "
          f"{cfg.dist.gpu_memory_gb:g} GB per GPU; GiB per rank, summed over the sweep:")
    print(note)
    cols = ("params", "grads", "optimizer", "activations", "built", "ready", "step", "eval", "peak", "host")
    rows = [("backend", *cols, "fits", "widest GPT")]
    for choice in CHOICES:
        w = 1 if choice.backend == "none" else world
        mem = plan_sweep(cfg, w, choice, k, node)
        widest = widest_gpt(cfg, choice, w, budget, node_size=node) if cfg.model.arch == "gpt" else 0
        rows.append((choice.label, *(gib_text(mem[c]) for c in cols), "yes" if mem["peak"] <= budget else "no",
                     str(widest)))
    print("\n".join(table_lines(rows)))
    if getattr(args, "dry_run", False):
        from fastwidth.parallel.dryrun import print_dry_run
        print_dry_run(cfg, args.ranks or [world])
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-rank memory for every backend / ZeRO stage / offload, and the widest GPT that fits")
    add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="shard the widest model for real on torch's fake process "
                   "group (meta tensors, one process) and report per-rank memory")
    p.add_argument("--ranks-per-node", type=int, default=None, help="ranks on each node, for dist.replicate=-1 "
                   "(HSDP per node; default: LOCAL_WORLD_SIZE, else one node)")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="rank counts of the dry run (default: dist.world_size)")
    p.set_defaults(func=cmd_plan)
