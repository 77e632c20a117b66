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


def cmd_plan(args) -> int:
    from fastwidth.config import load_config, resolve
    cfg = resolve(load_config(args.config, overrides_of(args)))
    world = cfg.dist.world_size or 1
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} is not divisible by dist.world_size={world}")
    k = micro_steps(cfg, world)
    counts = count_params(cfg)
    budget = cfg.dist.gpu_memory_gb * 1e9
    node, source = node_size_of(args)
    note = shard_note(cfg, world, node, source)   # before the table: a bad dist.replicate stops here
    print(f"{cfg.model.arch} widths {cfg.sweep.widths} x seeds {cfg.sweep.seeds} depth {cfg.model.depth}: widest "
          f"{counts['total'] / 1e6:.1f} M parameters; {world} ranks, global batch {cfg.data.batch_size} "
          f"({k} micro-batches), checkpointing {cfg.train.activation_checkpointing}, "
          f"{cfg.dist.gpu_memory_gb:g} GB per GPU; GiB per rank, summed over the sweep:")
    print(note)
    cols = ("params", "grads", "optimizer", "activations", "built", "ready", "step", "eval", "peak", "host")
    print(f"{'backend':34s}" + "".join(f"{c:>10s}" for c in cols) + f"{'fits':>6s}{'widest GPT':>12s}")
    for choice in CHOICES:
        w = 1 if choice.backend == "none" else world
        mem = plan_sweep(cfg, w, choice, k, node)
        widest = widest_gpt(cfg, choice, w, budget, node_size=node) if cfg.model.arch == "gpt" else 0
        print(f"{choice.label:34s}" + "".join(f"{mem[c] / GIB:10.2f}" for c in cols)
              + f"{'yes' if mem['peak'] <= budget else 'no':>6s}{widest:>12d}")
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
