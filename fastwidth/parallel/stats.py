"""Statistics under data parallelism: exact cross-rank reductions of what each rank saw.

- Preactivation moments and histograms: each rank accumulates its rows of every training batch;
  `sync_preacts` merges the per-rank summaries exactly (Pébay's pairwise formulas, float64, in
  rank order; histograms and counts summed; min / max reduced) so every rank then holds the
  summary of the whole global batch, as one process would.
- Probe signatures: `probe_signature_sharded` splits the probe's examples across ranks, reduces
  each rank's chunk to per-point values (true logit, loss, entropy, argmax, sketch) and gathers
  those, and gathers the kernel points' feature rows so Phi = phi phi^T / N is assembled exactly
  from the whole probe. Every rank runs the same number of forwards (FSDP2 / ZeRO-3 forwards are
  collectives), padding its slice when the probe does not split evenly.
- Sharpness and the eNTK need whole-model Hessian-vector products / per-point gradients: under a
  sharded backend (fsdp2, ZeRO-3) `check_sharded_stats` refuses them with one line; under ddp and
  ZeRO 1-2 every rank holds the whole model and they run unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fastwidth.errors import ConfigError
from fastwidth.stats import signature as S
from fastwidth.stats.moments import merge


def check_sharded_stats(cfg, engine) -> None:
    if engine is None or not engine.sharded or not cfg.stats.enabled:
        return
    what = "fsdp2" if engine.name == "fsdp2" else "deepspeed zero_stage=3"
    if cfg.stats.sharpness_iters:
        raise ConfigError(f"stats.sharpness_iters needs a gathered copy of the model and {what} shards it; "
                          f"set stats.sharpness_iters=0 or use ddp / zero_stage<=2")
    if cfg.stats.ntk_points:
        raise ConfigError(f"stats.ntk_points needs a gathered copy of the model and {what} shards it; "
                          f"set stats.ntk_points=0 or use ddp / zero_stage<=2")


def _gather_objects(obj, world: int) -> list:
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def sync_preacts(accumulators: dict, world: int) -> None:
    """Merge every accumulator's summary over ranks into rank 0's; the other ranks start empty (their
    rows now live in rank 0's summary, which is the one evaluated and checkpointed). accumulators:
    {key: PreactAccumulator} with the same keys on every rank. Collective."""
    if world <= 1 or not accumulators:
        return
    import numpy as np
    rank = dist.get_rank()
    mine = {k: a.state_dict()["carry"] for k, a in sorted(accumulators.items())}
    every = _gather_objects(mine, world)
    for k, a in accumulators.items():
        carries = [c[k] for c in every if c[k] is not None]
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
    captured: dict = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, k=k: captured.__setitem__(k, out))
             for k, m in feature_modules.items()]
    was = model.training
    model.eval()
    keys = ("true_logit", "loss", "entropy", "argmax", "sketch")
    parts = {k: [] for k in keys}
    feats = {k: [] for k in feature_modules}
    sums = torch.zeros(2, dtype=torch.float64)
    try:
        for off in range(0, per, spec.eval_batch):  # the same number of forwards on every rank
            s, e = lo + off, min(lo + off + spec.eval_batch, hi)
            if s >= e:  # padding forward: the first example, results dropped
                model(spec.x[:1].to(device))
                captured.clear()
                continue
            z = model(spec.x[s:e].to(device)).float()
            z = z.reshape(-1, z.shape[-1])
            yb = spec.y[s:e].reshape(-1).to(device)
            true, loss, ent, amax = S._point_stats(z, yb)
            sums += torch.tensor([float(loss.double().sum()), float((amax == yb).sum())], dtype=torch.float64)
            sel = S._select(spec.sig_index, s * pe, e * pe).to(device)
            zs = z[sel]
            sketch = (zs - zs.mean(-1, keepdim=True)) @ spec.projection(z.shape[-1], device)
            for key, v in zip(keys, (true[sel], loss[sel], ent[sel], amax[sel], sketch)):
                parts[key].append(v.to(S.STORE_DTYPES[key]).cpu())
            ksel = S._select(spec.kernel_index, s * pe, e * pe).to(device)
            for k in feature_modules:
                out = captured.pop(k)
                out = out[0] if isinstance(out, (tuple, list)) else out
                feats[k].append(out.reshape(len(yb), -1)[ksel].float().cpu())
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    local = {k: (torch.cat(v) if v else None) for k, v in parts.items()}
    local.update({f"phi/{k}": (torch.cat(v) if v else None) for k, v in feats.items()})
    every = _gather_objects({"parts": local, "sums": sums}, world)  # rank order = probe order
    sig = {k: torch.cat([g["parts"][k] for g in every if g["parts"][k] is not None]) for k in keys}
    for k in feature_modules:
        phi = torch.cat([g["parts"][f"phi/{k}"] for g in every if g["parts"][f"phi/{k}"] is not None])
        sig[f"kernel/{k}"] = S._kernel(phi.to(device)).to(S.STORE_DTYPES["kernel"]).cpu()
    total = sum(g["sums"] for g in every)
    points = spec.y.numel()
    return sig, {"loss": float(total[0]) / points, "accuracy": float(total[1]) / points}
