"""Placement per width: which engine trains each member of a sweep, and its micro-batching.

    placement = Placement(cfg, env)
    engine = placement.for_width(width)       # ddp below dist.shard_min_width, else placement.main:
                                              # the engine of dist.backend (none: the plain Engine)
    k = micro_steps(cfg, world_size)          # micro-batches per optimizer step on each rank

Every engine runs over the same process group and every rank draws the same global batch, so
narrow (replicated) and wide (sharded) members see the same stream and the same statistics.
"""
from __future__ import annotations

from fastwidth.errors import ConfigError
from fastwidth.parallel.engines import DDPEngine, Engine, FSDP2Engine
from fastwidth.parallel.plan import count_params, micro_steps  # noqa: F401 (micro_steps: public here too)

SHARDING = ("fsdp2", "deepspeed")


def largest_block(cfg) -> int:
    """Parameters of the largest shard unit of the widest model (DeepSpeed bucket sizes)."""
    from fastwidth.config import for_width
    return count_params(for_width(cfg, max(cfg.sweep.widths)))["block"]


def build_engine(cfg, env, **kw) -> Engine:
    """The engine of cfg.dist.backend; none: the single-process Engine (kw: DeepSpeed's)."""
    from fastwidth.parallel.zero import DeepSpeedEngine
    kinds = {"none": Engine, "ddp": DDPEngine, "fsdp2": FSDP2Engine, "deepspeed": DeepSpeedEngine}
    return kinds[cfg.dist.backend](cfg, env, **kw)


class Placement:
    def __init__(self, cfg, env):
        self.cfg, self.env = cfg, env
        self.k = micro_steps(cfg, env.world_size)
        dc = cfg.dist
        if dc.shard_min_width and dc.backend not in SHARDING:
            raise ConfigError(f"dist.shard_min_width={dc.shard_min_width} needs a sharded dist.backend "
                              f"(fsdp2 or deepspeed), got {dc.backend}")
        if dc.replicate == -1 and dc.backend != "fsdp2":
            raise ConfigError(f"dist.replicate=-1 (one replica group per node) needs dist.backend=fsdp2, got {dc.backend}")
        if dc.replicate > 1 and (dc.backend != "fsdp2" or env.world_size % dc.replicate):
            raise ConfigError(f"dist.replicate={dc.replicate} needs dist.backend=fsdp2 and a rank count divisible "
                              f"by it (got {dc.backend} on {env.world_size} ranks)")
        kw = {}
        if dc.backend == "deepspeed":
            kw = {"block_params": largest_block(cfg), "micro_steps": self.k}
        self.main = build_engine(cfg, env, **kw)
        narrow = [w for w in cfg.sweep.widths if w < dc.shard_min_width]
        self.replicated = DDPEngine(cfg, env) if narrow else None  # shard_min_width: a sharded backend

    def for_width(self, width: int) -> Engine:
        if self.replicated is not None and width < self.cfg.dist.shard_min_width:
            return self.replicated
        return self.main
