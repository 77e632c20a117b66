"""Statistics under data parallelism: exact cross-rank reductions of what each rank saw.

- Preactivation moments and histograms: each rank accumulates its rows of every training batch;
  `sync_preacts` merges the per-rank summaries exactly (Pébay's pairwise formulas, float64, in
  rank order; histograms and counts summed; min / max reduced) so every rank then holds the
  summary of the whole global batch, as one process would.
- Probe signatures: `probe_signature_sharded` splits the probe's examples across ranks, reduces
  each rank's chunk to per-point values (true logit, loss, entropy, argmax, sketch) and gathers
  those, and gathers the kernel points' feature rows so Phi = phi phi^T / N is assembled exactly
  from the whole probe. The feature hooks keep only the kernel points' rows of each block's
  output (on the host: stats.signature.KernelRows), not the whole output until the forward ends;
  forwards run in micro-batches of stats.eval_batch examples. Every rank runs the same number of forwards (FSDP2 / ZeRO-3 forwards are
  collectives), padding its slice when the probe does not split evenly.
- Sharpness and the eNTK need whole-model Hessian-vector products / per-point gradients: under a
  sharded backend (fsdp2, ZeRO-3) `sharded_skips` names them and the run goes on without them
  (one warning line and a `skipped` row each); under ddp and ZeRO 1-2 every rank holds the whole
  model and they run, ZeRO-1/2 preconditioned by DeepSpeed's own Adam state (zero_optimizer_view).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fastwidth.stats import signature as S
from fastwidth.stats.moments import merge


def sharded_skips(cfg, engines) -> dict[str, str]:
    """{stats key: why} for the whole-model statistics a sharded engine cannot run here (they need
    every parameter on one rank: Hessian-vector products, per-point gradients). The run goes on
    without them (one warning line and a `skipped` metrics row each); ddp and ZeRO-1/2 run them."""
    sharded = [e for e in engines if e is not None and e.sharded]
    if not sharded or not cfg.stats.enabled:
        return {}
    what = "fsdp2" if sharded[0].name == "fsdp2" else "deepspeed zero_stage=3"
    out = {}
    if cfg.stats.sharpness_iters:
        out["sharpness_iters"] = f"sharpness needs Hessian-vector products through the whole model and {what} shards it"
    if cfg.stats.ntk_points:
        out["ntk_points"] = f"the eNTK needs per-point gradients of the whole model and {what} shards it"
    return out


def without(cfg, skips: dict):
    """cfg with the skipped statistics turned off (for the Monitor only; the run records the user's)."""
    import dataclasses
    if not skips:
        return cfg
    return dataclasses.replace(cfg, stats=dataclasses.replace(cfg.stats, **{k: 0 for k in skips}))


def zero_optimizer_view(model, ds_optimizer):
    """A torch AdamW over `model`'s parameters holding DeepSpeed ZeRO-1/2's Adam state per parameter,
    for the Adam-preconditioned sharpness. DeepSpeed keeps the state of flat fp32 partitions; each
    rank copies its fragment of a parameter's exp_avg_sq (the parameter's `_hp_mapping` addresses,
    as deepspeed.utils.tensor_fragment.get_full_hp_param does) into a zero buffer and an all-reduce
    over the data-parallel group assembles the whole tensor. Collective."""
    named = dict(model.named_parameters())
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [named[n] for n in g["names"]]}
              for g in ds_optimizer.param_groups]
    view = torch.optim.AdamW(groups, lr=groups[0]["lr"])
    inner = getattr(ds_optimizer, "optimizer", ds_optimizer)
    flats = ds_optimizer.single_partition_of_fp32_groups
    steps = [float(inner.state[f]["step"]) for f in flats if "step" in inner.state.get(f, {})]
    if not steps:
        return view
    for lp_group, flat in zip(ds_optimizer.bit16_groups, flats):
        sq = inner.state[flat]["exp_avg_sq"]
        for p in lp_group:
            full = torch.zeros(p.numel(), dtype=torch.float32, device=sq.device)
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                lp, hp = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
                full.narrow(0, lp.start, lp.numel).copy_(sq.narrow(0, hp.start, hp.numel))
            dist.all_reduce(full, group=getattr(p, "_dp_group", None))
            view.state[p] = {"step": torch.tensor(max(steps)), "exp_avg_sq": full.reshape(p.shape).to(p.device)}
    return view


def attach_optimizer_views(monitor, placement) -> None:
    """Sharpness under DeepSpeed ZeRO-1/2 reads DeepSpeed's Adam state through zero_optimizer_view."""
    def optimizer_of(m):
        engine = placement.for_width(m.width)
        if engine is not None and engine.name == "deepspeed" and not engine.sharded:
            return zero_optimizer_view(m.model, m.optimizer)
        return m.optimizer
    for mon in (getattr(monitor, "monitors", None) or {None: monitor}).values():  # sweep.LRMonitors: one per lr
        mon.optimizer_of = optimizer_of


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
