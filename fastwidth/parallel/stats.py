"""Statistics under data parallelism: exact cross-rank reductions of what each rank saw.

- Preactivation moments and histograms: each rank accumulates its rows of every training batch;
  `sync_preacts` merges the per-rank summaries exactly (Pébay's pairwise formulas, float64, in
  rank order; histograms and counts summed; min / max reduced) so every rank then holds the
  summary of the whole global batch, as one process would. Summing histograms is exact because
  every rank bins on the run's one set of bins (stats/preact_range.py: asinh units of the
  reference width's first evaluation, fixed for the run; sync_ranges checks every rank holds them).
- Probe signatures: `probe_signature_sharded` splits the probe's examples across ranks, reduces
  each rank's chunk to per-point values (true logit, loss, entropy, argmax, sketch) and gathers
  those, and gathers the kernel points' feature rows so Phi = phi phi^T / N is assembled exactly
  from the whole probe. The feature hooks keep only the kernel points' rows of each block's
  output (on the host: stats.signature.KernelRows), not the whole output until the forward ends;
  forwards run in micro-batches of stats.eval_batch examples. Every rank runs the same number of forwards (FSDP2 / ZeRO-3 forwards are
  collectives), padding its slice when the probe does not split evenly.
- Sharpness, the eNTK and coord rows need whole-model Hessian-vector products / per-point
  gradients / layer forwards: they run on `whole_member(m)`, the engine's `gathered` view of one
  member at a time (a replica under FSDP2 / ZeRO-3, Adam's v̂ gathered whole under every engine),
  so each equals the single-process value; sharpness (the evaluation rows and batch_sharpness,
  stats/sharpness.py train_batch_sharpness) averages each rank's HVP on its share of the training
  batch (Engine.batch_mean), the global batch's.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist

from fastwidth.stats import signature as S
from fastwidth.stats.moments import merge


@contextlib.contextmanager
def whole_member(m):
    """Member m as one process holds it, for the statistics that need whole parameters (sharpness,
    the eNTK, coord): a copy of m whose model and optimizer are its engine's `gathered` view
    (engines.py: the member itself under ddp / ZeRO-1/2 / one process, a replica under FSDP2 /
    ZeRO-3, freed when the block ends). Collective under sharded engines."""
    with m.handle.gathered() as whole:
        yield dataclasses.replace(m, model=whole.model, optimizer=whole.optimizer)


def _gather_objects(obj, world: int) -> list:
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def sync_preacts(accumulators: dict, world: int) -> None:
    """Merge every accumulator's summary over ranks into rank 0's; the other ranks start empty (their
    rows now live in rank 0's summary, which is the one evaluated and checkpointed). accumulators:
    {key: PreactAccumulator} with the same keys on every rank. Collective."""
    if world <= 1:
        return
    import numpy as np
    rank = dist.get_rank()
    mine = {k: a.state_dict()["carry"] for k, a in sorted(accumulators.items())}
    every = _gather_objects(mine, world)
    for k, a in accumulators.items():
        carries = [c[k] for c in every if c.get(k) is not None]
        if rank != 0 or not carries:
            a.reset()
            continue
        acc = (0, 0.0, 0.0, 0.0, 0.0)
        mn, mx, hist = float("inf"), float("-inf"), np.zeros(a.bins)
        for c in carries:
            acc = merge(acc, tuple(c[:5]))
            mn, mx = min(mn, c[5]), max(mx, c[6])
            hist = hist + np.asarray(c[7], dtype=np.float64)
        a.reset()
        a._carry = (*acc, mn, mx, hist)


def sync_monitor(monitor, members: list, world: int) -> None:
    """sync_preacts over every member's accumulators of a stats.monitor.Monitor (its `acc`)."""
    accs = getattr(monitor, "acc", None)
    if accs is None or world <= 1:
        return
    flat = {(m.name, layer): a for m in members for layer, a in accs.get(m.name, {}).items()}
    sync_preacts(flat, world)


def sync_ranges(monitor, world: int) -> None:
    """Every rank takes rank 0's preactivation histogram ranges (stats.hist_range 0), so all ranks
    hold the same accumulators and run the same collectives: a resumed rank that had not loaded
    the ranges would otherwise set them at the next evaluation with a forward of its own (under
    fsdp2 and ZeRO-3 a collective the other ranks never join). The cause, since fixed: those ranks'
    Monitor read the ranges from their scratch run_dir (out_dir/.rank<r>, emptied at each start),
    not from the run directory (Monitor ranges_dir); this stays as a guard that all ranks agree,
    one broadcast at start-up. Collective."""
    if world <= 1:
        return
    for mon in getattr(monitor, "monitors", {None: monitor}).values():
        if not hasattr(mon, "ranges"):
            continue
        box = [mon.ranges]
        dist.broadcast_object_list(box, src=0)
        if mon.ranges != box[0]:
            mon.ranges = box[0]
            if box[0] is None:  # rank 0 sets them at its first evaluation: so will this rank
                mon.acc = {name: {} for name in mon.acc}
            else:
                mon._make_accumulators()


def keep_on_main(monitor, rank: int) -> None:
    """After a resume every rank loaded rank 0's (global) summary: only rank 0 keeps it."""
    if rank != 0:
        for accs in (getattr(monitor, "acc", None) or {}).values():
            for a in accs.values():
                a.reset()


def _rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    per = -(-n // world)
    return min(rank * per, n), min((rank + 1) * per, n)


@torch.no_grad()
def probe_signature_sharded(model, spec: S.ProbeSpec, device, rank: int, world: int,
                            feature_modules: dict | None = None) -> tuple[dict, dict]:
    """stats.signature.probe_signature with the probe's examples split over `world` ranks. Collective;
    returns the same signature on every rank."""
    feature_modules = feature_modules or {}
    n, pe = spec.n_examples, spec.per_example
    lo, hi = _rank_slice(n, rank, world)
    per = -(-n // world)
    rows = S.KernelRows(feature_modules, to_host=True)  # only the kernel points' rows, on the host
    was = model.training
    model.eval()
    keys = ("true_logit", "loss", "entropy", "argmax", "sketch")
    parts = {k: [] for k in keys}
    sums = torch.zeros(2, dtype=torch.float64)
    try:
        for off in range(0, per, spec.eval_batch):  # the same number of forwards on every rank
            s, e = lo + off, min(lo + off + spec.eval_batch, hi)
            if s >= e:  # padding forward: the first example, results dropped
                rows.expect(1, None)
                model(spec.x[:1].to(device))
                continue
            yb = spec.y[s:e].reshape(-1).to(device)
            rows.expect(len(yb), S._select(spec.kernel_index, s * pe, e * pe).to(device))
            z = model(spec.x[s:e].to(device)).float()
            z = z.reshape(-1, z.shape[-1])
            true, loss, ent, amax = S._point_stats(z, yb)
            sums += torch.tensor([float(loss.double().sum()), float((amax == yb).sum())], dtype=torch.float64)
            sel = S._select(spec.sig_index, s * pe, e * pe).to(device)
            zs = z[sel]
            sketch = (zs - zs.mean(-1, keepdim=True)) @ spec.projection(z.shape[-1], device)
            for key, v in zip(keys, (true[sel], loss[sel], ent[sel], amax[sel], sketch)):
                parts[key].append(v.to(S.STORE_DTYPES[key]).cpu())
    finally:
        rows.remove()
        model.train(was)
    local = {k: (torch.cat(v) if v else None) for k, v in parts.items()}
    local.update({f"phi/{k}": rows.phi(k) for k in feature_modules})
    every = _gather_objects({"parts": local, "sums": sums}, world)  # rank order = probe order
    sig = {k: torch.cat([g["parts"][k] for g in every if g["parts"][k] is not None]) for k in keys}
    for k in feature_modules:
        phi = torch.cat([g["parts"][f"phi/{k}"] for g in every if g["parts"][f"phi/{k}"] is not None])
        sig[f"kernel/{k}"] = S._kernel(phi.to(device)).to(S.STORE_DTYPES["kernel"]).cpu()
    total = sum(g["sums"] for g in every)
    points = spec.y.numel()
    return sig, {"loss": float(total[0]) / points, "accuracy": float(total[1]) / points}
