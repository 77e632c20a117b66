"""A dry run of a config at any rank count in one process: torch's fake process group, meta tensors.

    fastwidth plan --config configs/dist/gpt_16k_8gpu.yaml --dry-run --ranks 8 64

For each rank count the widest model is built on the meta device and sharded for real under
the fake backend (torch.testing._internal.distributed.fake_pg.FakeStore, backend "fake": every
collective returns at once, nothing is allocated): FSDP2's `fully_shard` over a 1-D mesh gives the
exact local shard of every parameter on rank 0 (the largest, FSDP2 pads the last ranks) and on
the last rank; ZeRO-3's flat partitions follow DeepSpeed's layout (ceil(n / W) elements per rank,
partition_parameters.py). Those local sizes replace P/W in the planner's per-member terms, so the
report is the planner's per-rank memory with the real sharding arithmetic, without the hardware.
"""
from __future__ import annotations

import math


from fastwidth.config import Config, for_width

GIB = 1 << 30


def local_numels(cfg: Config, world: int, rank: int) -> dict:
    """{"fsdp2": elements on `rank` after fully_shard, "zero3": its ZeRO-3 partition, "total"}."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fastwidth.models import build_meta
    from fastwidth.parallel.engines import shard_units
    from fastwidth.parallel.plan import _io
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        model = build_meta(cfg, _io(cfg))
        total = sum(p.numel() for p in model.parameters())
        zero3 = sum(math.ceil(p.numel() / world) for p in model.parameters())
        mesh = init_device_mesh("cpu", (world,))
        for unit in shard_units(model):
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        fsdp2 = sum(p.to_local().numel() for p in model.parameters())
        shapes = {n: tuple(p.to_local().shape) for n, p in list(model.named_parameters())[:3]}
    finally:
        dist.destroy_process_group()
    return {"fsdp2": fsdp2, "zero3": zero3, "total": total, "shapes": shapes}


def dry_run(cfg: Config, world: int) -> list[dict]:
    """Per-rank memory of the widest member under the configured choice, fsdp2 and ZeRO-3 (+
    optimizer offload), at `world` ranks, for rank 0 and the last rank."""
    import dataclasses
    from fastwidth.parallel.plan import Choice, choice_of, count_params, member_plan, micro_steps
    wide = for_width(cfg, max(cfg.sweep.widths or [cfg.model.width]))
    per_rank = max(1, cfg.data.batch_size // max(cfg.dist.world_size or 1, 1))  # the config's rows per rank
    wide = dataclasses.replace(wide, data=dataclasses.replace(wide.data, batch_size=per_rank * world))
    counts = count_params(wide)
    k = micro_steps(wide, world)
    out = []
    for rank in sorted({0, world - 1}):
        local = local_numels(wide, world, rank)
        for choice in dict.fromkeys([choice_of(cfg), Choice("fsdp2"), Choice("deepspeed", 3),
                                     Choice("deepspeed", 3, True)]):
            key = "fsdp2" if choice.backend == "fsdp2" else "zero3" if choice.sharded else None
            # the planner's P/W replaced by this rank's exact local count: effective world P / local
            eff = counts["total"] / local[key] if key else world
            plan = member_plan(wide, choice, world, counts, k)
            if key:
                plan = member_plan(wide, choice, eff, counts, k)
            peak = max(plan["built"], plan["ready"], plan["persistent"] + plan["step"], plan["persistent"] + plan["eval"])
            out.append({"ranks": world, "rank": rank, "choice": choice.label, "local_params": local[key] if key else
                        counts["total"], "params": plan["params"], "grads": plan["grads"],
                        "optimizer": plan["optimizer"], "activations": plan["activations"], "peak": peak,
                        "host": plan["host"], "shapes": local["shapes"]})
    return out


def print_dry_run(cfg: Config, ranks: list[int]) -> None:
    budget = cfg.dist.gpu_memory_gb * 1e9
    print(f"dry run (fake process group, meta tensors): widest width {max(cfg.sweep.widths or [cfg.model.width])}, "
          f"the config's rows per rank at every rank count, GiB per rank, {cfg.dist.gpu_memory_gb:g} GB per GPU")
    cols = ("params", "grads", "optimizer", "activations", "peak", "host")
    print(f"{'ranks':>6s}{'rank':>6s}  {'backend':32s}{'local params':>14s}" + "".join(f"{c:>12s}" for c in cols)
          + f"{'fits':>6s}")
    for world in ranks:
        for r in dry_run(cfg, world):
            print(f"{r['ranks']:6d}{r['rank']:6d}  {r['choice']:32s}{r['local_params']:14d}"
                  + "".join(f"{r[c] / GIB:12.2f}" for c in cols) + f"{'yes' if r['peak'] <= budget else 'no':>6s}")
