"""Error bars of the per-width points: 95% bootstrap intervals over seeds (stats/ensemble.py).

    iv = width_intervals(run)   # {width: {"true_logit_rmse", "true_logit_rmse_ci", "seed_variance_ci"}}

- true_logit_rmse: the late-time RMSE the report quotes (mean over the last 25% of tokens of the
  seed-mean same-seed RMSE, report/reader.late_mean), its interval resampling the seeds whose
  consistency rows make it (tail_mean_ci), so the value is the one summary.json's widths[] carry.
- seed_variance_ci: the interval the loop wrote beside V_N in the final ensemble rows; a run
  written before the loop did is bootstrapped here from the signatures' true logits at that step
  (the same estimator, SeedEnsembles). true_logit_rmse_ci is None with fewer than 3 seeds,
  seed_variance_ci with fewer than 4 (stats/ensemble.py MIN_SEEDS_VARIANCE_CI).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastwidth.report.reader import Run
from fastwidth.stats.ensemble import MIN_SEEDS_VARIANCE_CI, SeedEnsembles, covering, tail_mean_ci

TAIL = 0.25          # the report's late window (reader.late_mean)
N_BOOT = 1000


def with_interval(value, ci, fmt: str = ".4g", *, missing: str = "–", no_ci: str = "") -> str:
    """The report's one way of printing a number with its interval, `value [lo, hi]`: `missing`
    where the value is absent or not finite, `no_ci` appended where it has no interval."""
    if value is None or not math.isfinite(value):
        return missing
    return format(value, fmt) + (f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]" if ci else no_ci)


def late_rmse_with_ci(run: Run, key: str = "true_logit_rmse", rows: list[dict] | None = None,
                      by: tuple[str, ...] = ("width",)) -> dict:
    """{width: (late mean over seeds of row[key], its interval)} from the live consistency rows;
    `rows` (default: the run's live consistency rows) and `by` (the keys that name a point, e.g.
    ("width", "depth") across depth: then keyed by the tuple)."""
    per: dict = {}
    for r in run.rows("consistency", ref="live") if rows is None else rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            point = r[by[0]] if len(by) == 1 else tuple(r[k] for k in by)
            per.setdefault(point, {}).setdefault(r["seed"], {})[r["tokens"]] = v
    out = {}
    for w, by_seed in sorted(per.items()):
        tokens = sorted({t for d in by_seed.values() for t in d})
        tail = [t for t in tokens if t >= (1 - TAIL) * tokens[-1]] or tokens[-1:]
        m = np.array([[d.get(t, math.nan) for t in tail] for _, d in sorted(by_seed.items())])
        out[w] = tail_mean_ci(m, N_BOOT, seed=w if isinstance(w, int) else hash(w) % 2**31)
    return out


def final_ensemble(run: Run) -> tuple[int | None, dict[int, dict]]:
    """(step, {width: ensemble row}) of the run's last ensemble rows (the loop's V_N, b² and intervals)."""
    step = max((r["step"] for r in run.rows("ensemble")), default=None)
    return step, {r["width"]: r for r in run.rows("ensemble", step=step)} if step is not None else {}


def signature_ensembles(run: Run, step: int, min_seeds: int = MIN_SEEDS_VARIANCE_CI) -> SeedEnsembles | None:
    """The loop's estimator (SeedEnsembles) rebuilt from the signatures' true logits at `step`;
    None unless every width has them for >= min_seeds seeds."""
    seeds = sorted({r["seed"] for r in run.rows("eval") if r.get("seed", -1) >= 0})
    if len(seeds) < min_seeds or run.ref_width not in run.widths:
        return None
    true, have = {}, {}
    for w in run.widths:
        got = [(s, run.signature(run.member_name(w, s), step)) for s in seeds]
        got = [(s, g[0]["true_logit"]) for s, g in got if g and "true_logit" in g[0]]
        if len(got) < min_seeds:
            return None
        have[w] = [s for s, _ in got]
        true[w] = np.stack([np.asarray(t, dtype=np.float64) for _, t in got])
    return SeedEnsembles({w: torch.from_numpy(t) for w, t in true.items()}, have, run.ref_width)


def _variance_from_signatures(run: Run, step: int) -> dict[int, list | None]:
    """seed_variance_ci per width recomputed from the stored true logits at `step` ({} if absent)."""
    est = signature_ensembles(run, step)
    if est is None:
        return {}
    return {w: r.get("seed_variance_ci") for w, r in est.width_rows(N_BOOT).items()}


def width_intervals(run: Run) -> dict[int, dict]:
    """{width: {true_logit_rmse, true_logit_rmse_ci, seed_variance, seed_variance_ci}} (module docstring)."""
    out: dict[int, dict] = {w: {} for w in run.widths}
    for w, (v, ci) in late_rmse_with_ci(run).items():
        out.setdefault(w, {}).update(true_logit_rmse=v, true_logit_rmse_ci=ci)
    step, ens = final_ensemble(run)
    rebuilt = None
    for w, r in ens.items():
        # a run written before MIN_SEEDS_VARIANCE_CI may hold an interval over 3 seeds, which
        # the calibration found to cover 0.84-0.93 of the time: not shown
        ci = r.get("seed_variance_ci") if r.get("n_seeds", 0) >= MIN_SEEDS_VARIANCE_CI else None
        if ci is None and r.get("seed_variance") is not None and r.get("n_seeds", 0) >= MIN_SEEDS_VARIANCE_CI:
            rebuilt = _variance_from_signatures(run, step) if rebuilt is None else rebuilt
            ci = rebuilt.get(w)
        v = r.get("seed_variance")
        out.setdefault(w, {}).update(seed_variance=v, seed_variance_ci=covering(ci, v) if v is not None else ci)
    return out
