"""Statistics under data parallelism: exact cross-rank reductions of what each rank saw.

- Preactivation moments and histograms: each rank accumulates its rows of every training batch;
  `merge_over_ranks` (Monitor.sync_preacts) merges the per-rank summaries exactly (Pébay's pairwise
  formulas, float64, in rank order; histograms and counts summed; min / max reduced) so rank 0 then
  holds the summary of the whole global batch, as one process would. Summing histograms is exact
  because every rank bins on the run's one set of bins (stats/preact_range.py: asinh units of the
  reference width's first evaluation, fixed for the run; Monitor.sync_ranges makes every rank hold
  rank 0's).
- Probe signatures: stats/signature.py's probe_signature(..., rank, world) splits the probe's
  examples over the ranks (`rank_slice`) and gathers the per-point values and kernel rows
  (`gather_objects`).
- Sharpness, the eNTK and coord rows need whole-model Hessian-vector products / per-point
  gradients / layer forwards: they run on `whole_member(m)`, the engine's `gathered` view of one
  member at a time (a replica under FSDP2 / ZeRO-3, Adam's v̂ gathered whole under every engine),
  so each equals the single-process value; sharpness (the evaluation rows and batch_sharpness,
  stats/sharpness.py train_batch_sharpness) averages each rank's HVP on its share of the training
  batch (the engine's batch_mean), the global batch's.
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from fastwidth.stats.moments import merge


@contextlib.contextmanager
def whole_member(m):
    """Member m as one process holds it, for the statistics that need whole parameters (sharpness,
    the eNTK, coord): a copy of m whose model and optimizer are its engine's `gathered` view
    (parallel/engines.py: the member itself under ddp / ZeRO-1/2 / one process, a replica under
    FSDP2 / ZeRO-3, freed when the block ends). Collective under sharded engines. A member without
    an engine handle (a model and its optimizer, as the statistics' tests make them) is whole already."""
    handle = getattr(m, "handle", None)
    if handle is None:
        yield m
        return
    with handle.gathered() as whole:
        yield dataclasses.replace(m, model=whole.model, optimizer=whole.optimizer)


def gather_objects(obj, world: int) -> list:
    """Every rank's `obj`, in rank order. Collective."""
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank. Collective."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of `rank`'s share of n items split into `world` runs of ⌈n/world⌉ (the last ones short)."""
    per = -(-n // world)
    return min(rank * per, n), min((rank + 1) * per, n)


def merge_over_ranks(accumulators: dict, rank: int, world: int) -> None:
    """Merge every accumulator's summary over ranks into rank 0's; the other ranks start empty (their
    rows now live in rank 0's summary, which is the one evaluated and checkpointed). accumulators:
    {key: PreactAccumulator} with the same keys on every rank. Collective when world > 1."""
    if world <= 1:
        return
    mine = {k: a.state_dict()["carry"] for k, a in sorted(accumulators.items())}
    every = gather_objects(mine, world)
    for k, a in accumulators.items():
        carries = [c[k] for c in every if c.get(k) is not None]
        a.reset()
        if rank != 0 or not carries:
            continue
        acc = (0, 0.0, 0.0, 0.0, 0.0)
        mn, mx, hist = float("inf"), float("-inf"), np.zeros(a.bins)
        for c in carries:
            acc = merge(acc, tuple(c[:5]))
            mn, mx = min(mn, c[5]), max(mx, c[6])
            hist = hist + np.asarray(c[7], dtype=np.float64)
        a.set_summary((*acc, mn, mx, hist))
