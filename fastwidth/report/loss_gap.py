"""The loss gap ΔL_N = L_N - L_ref fitted against N early and late in training, with bootstrap intervals over seeds.

    got = gap_fits(run)      # {"early": fit, "late": fit}: two evaluations of the run
    fit = fit_gap(diffs, ref_width)   # diffs {width: per-seed L_N,s - L_ref,s}, seeds in one order

At an evaluation, ΔL_N is the seed mean of the probe loss (eval rows' probe_loss) at width N
minus the reference width's: the mean over seeds s of L_{N,s} - L_{ref,s} (the seeds both widths
have). Its interval resamples those seeds (stats/ensemble.py tail_mean_ci: basic bootstrap,
expanded for few seeds). The fit ΔL_N ∝ N^slope (slope = -a) is least squares on log-log over the
widths narrower than the reference; its interval resamples the seeds once for every width (a
seed's differences share its reference model), the replicate slopes by masked_slopes and the
interval by basic_ci, expanded like the per-width ones. The fit is "not identified", with the
reason and never a slope, with fewer than MIN_SEEDS_CI seeds or 2 narrower widths, where some
ΔL_N <= 0 or its interval reaches 0 (a log-log slope through points noise made), or where fewer
than 90% of the replicates have every ΔL_N > 0.

The evaluations: "early" is the first one at or after EARLY_FRAC of train.steps, "late" the final
one. The section's protocol (report/sections.py): FIGURES, summary_lines, summary_json.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fastwidth.report.intervals import with_interval
from fastwidth.report.reader import Run
from fastwidth.stats.ensemble import (CI_LEVEL, MIN_SEEDS_CI, basic_ci, expansion, masked_slopes,
                                      tail_mean_ci)
from fastwidth.stats.metrics import fit_power_law

EARLY_FRAC = 0.1
N_BOOT = 1000


def fit_gap(diffs: dict[int, np.ndarray], ref_width: int, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """ΔL_N per width with its interval and the power-law fit over the widths below ref_width
    (module docstring). diffs: {width: (S,) L_{N,s} - L_{ref,s}}, the same S seeds in the same
    order at every width. Returns {"widths": [{"width", "gap", "gap_ci"}], "slope", "slope_ci",
    "amplitude", "fit_widths", "n_seeds", "reason"}; slope None and reason set when not identified."""
    ws = sorted(w for w in diffs if w != ref_width)
    n_seeds = min((len(diffs[w]) for w in ws), default=0)
    per = {w: tail_mean_ci(np.asarray(diffs[w], dtype=np.float64)[:, None], n_boot, seed=w) for w in ws}
    out = {"widths": [{"width": w, "gap": per[w][0], "gap_ci": per[w][1]} for w in ws], "slope": None,
           "slope_ci": None, "amplitude": None, "fit_widths": [w for w in ws if w < ref_width],
           "n_seeds": n_seeds, "reason": None}
    fw = out["fit_widths"]
    bad = [w for w in fw if not per[w][0] > 0]
    wide = [w for w in fw if per[w][1] is None or per[w][1][0] <= 0]
    if len(fw) < 2:
        out["reason"] = f"fewer than 2 widths below the reference {ref_width}"
    elif n_seeds < MIN_SEEDS_CI:
        out["reason"] = f"{n_seeds} seed(s): an interval needs >= {MIN_SEEDS_CI}"
    elif bad:
        out["reason"] = f"ΔL_N <= 0 at N = {', '.join(map(str, bad))} (no gap to fit)"
    elif wide:
        out["reason"] = f"the interval of ΔL_N reaches 0 at N = {', '.join(map(str, wide))}"
    if out["reason"]:
        return out
    d = np.stack([np.asarray(diffs[w], dtype=np.float64)[:n_seeds] for w in fw])          # (W, S)
    slope, intercept = fit_power_law(fw, d.mean(1))
    pos = np.random.default_rng(seed).integers(0, n_seeds, (n_boot, n_seeds))
    weights = (pos[:, :, None] == np.arange(n_seeds)).sum(1).astype(np.float64)           # (B, S)
    reps = weights @ d.T / weights.sum(1, keepdims=True)                                   # (B, W)
    reps = np.where((reps > 0).all(1, keepdims=True), reps, np.nan)
    ci = basic_ci(slope, masked_slopes(fw, reps), slope, CI_LEVEL, expand=expansion([n_seeds]))
    if ci is None:
        out["reason"] = "under 90% of the bootstrap replicates have ΔL_N > 0 at every width"
        return out
    return {**out, "slope": slope, "slope_ci": ci, "amplitude": math.exp(intercept)}


def eval_steps(run: Run) -> dict[str, int]:
    """{"early": the first evaluation at or after EARLY_FRAC of train.steps, "late": the final one};
    "early" left out when it is the final one, {} without evaluations after step 0."""
    steps = sorted({r["step"] for r in run.rows("eval") if isinstance(r.get("probe_loss"), (int, float))
                    and r["step"] > 0})
    if not steps:
        return {}
    total = run.config.get("train", {}).get("steps") or steps[-1]
    early = next((s for s in steps if s >= EARLY_FRAC * total), steps[-1])
    return {"early": early, "late": steps[-1]} if early != steps[-1] else {"late": steps[-1]}


def gap_diffs(run: Run, step: int) -> tuple[dict[int, np.ndarray], int]:
    """({width: per-seed L_{N,s} - L_{ref,s} at `step`, seeds every width and the reference share}, tokens)."""
    loss: dict[int, dict[int, float]] = {}
    tokens = 0
    for r in run.rows("eval", step=step):
        v = r.get("probe_loss")
        if isinstance(v, (int, float)) and math.isfinite(v) and r.get("seed", -1) >= 0:
            loss.setdefault(r["width"], {})[r["seed"]] = float(v)
            tokens = r["tokens"]
    ref = run.ref_width
    if ref not in loss:
        return {}, tokens
    seeds = sorted(set.intersection(*(set(d) for d in loss.values())))
    return {w: np.array([d[s] - loss[ref][s] for s in seeds]) for w, d in sorted(loss.items()) if seeds}, tokens


def gap_fits(run: Run) -> dict[str, dict]:
    """{"early" | "late": fit_gap's result with "step" and "tokens"} (eval_steps)."""
    out = {}
    for when, step in eval_steps(run).items():
        diffs, tokens = gap_diffs(run, step)
        if len(diffs) >= 2:
            out[when] = {"step": step, "tokens": tokens, **fit_gap(diffs, run.ref_width)}
    return out


def _ci(v, ci) -> str:
    return with_interval(v, ci, "+.3g", no_ci=" (no interval)")


def _fit_text(fit: dict) -> str:
    if fit["slope"] is None:
        return f"not identified: {fit['reason']}"
    return f"slope {_ci(fit['slope'], fit['slope_ci'])} (ΔL_N ∝ N^slope over N = {', '.join(map(str, fit['fit_widths']))})"


def loss_gap_figure(runs: list[Run], path: Path) -> Path | None:
    """ΔL_N against N, log-log, early and late: seed means with 95% intervals, the fitted power laws."""
    from fastwidth.report._plotbase import _loglog_axes, _panels, _save
    found = [(run, gap_fits(run)) for run in runs]
    found = [(run, fits) for run, fits in found if fits]
    if not found:
        return None
    fig, axes = _panels([run for run, _ in found], height=4.2, sharey=False)
    colors = {"early": "tab:orange", "late": "tab:blue"}
    for ax, (run, fits) in zip(axes, found):
        for when, fit in fits.items():
            c = colors[when]
            shown = [p for p in fit["widths"] if p["gap"] > 0 and p["gap_ci"]]
            for p in shown:                 # an interval reaching 0: hollow, its bar cut at ΔL_N / 10
                lo, hi = p["gap_ci"]
                ax.errorbar([p["width"]], [p["gap"]], yerr=[[p["gap"] - max(lo, p["gap"] / 10)], [hi - p["gap"]]],
                            fmt="o", color=c, capsize=3, ms=4, mfc=c if lo > 0 else "none")
            for p in fit["widths"]:
                if p not in shown and p["gap_ci"] and p["gap_ci"][1] > 0:
                    ax.plot([p["width"]], [p["gap_ci"][1]], "v", mfc="none", color=c)
            if shown:
                ax.plot(*zip(*[(p["width"], p["gap"]) for p in shown]), "-", lw=0.6, color=c, alpha=0.5)
            if fit["slope"] is not None:
                xs = np.array(fit["fit_widths"], dtype=float)
                ax.plot(xs, fit["amplitude"] * xs ** fit["slope"], "--", lw=1.5, color=c)
            ax.plot([], [], "o--", color=c, label=f"{when}: step {fit['step']} ({fit['tokens']:,} seen), {_fit_text(fit)}")
        ax.plot([], [], "o", mfc="none", color="gray", label="hollow: the interval reaches 0 (bar cut at ΔL_N / 10)")
        ax.plot([], [], "v", mfc="none", color="gray", label="ΔL_N <= 0 or no interval: upper end of its CI")
        if any(len(line.get_xdata()) for line in ax.lines):
            _loglog_axes(ax, run.widths)
        else:                                       # nothing positive to put on a log axis
            ax.text(0.5, 0.5, "ΔL_N and its interval <= 0 at every width", transform=ax.transAxes, ha="center",
                    fontsize=8)
            ax.set_xticks([])
        n = max(f["n_seeds"] for f in fits.values())
        ax.set_title(f"{run.label}: ΔL_N = L_N - L_ref (N_ref = {run.ref_width}), {n} seeds\n"
                     f"probe loss, seed means, 95% bootstrap over seeds; dashed: fits", fontsize=8)
        ax.set_ylabel("probe-loss gap ΔL_N (nats)")
        ax.legend(fontsize=5.5, loc="lower left")
    return _save(fig, path)


FIGURES = {"loss_gap.png": loss_gap_figure}


def summary_lines(runs: list[Run]) -> list[str]:
    lines = []
    for run in runs:
        for when, fit in gap_fits(run).items():
            per = ", ".join(f"N={p['width']}: {_ci(p['gap'], p['gap_ci'])}" for p in fit["widths"])
            lines.append(f"- {run.label}, {when} (step {fit['step']}, {fit['tokens']:,} seen, {fit['n_seeds']} seeds): "
                         f"{_fit_text(fit)}. ΔL_N (nats): {per}.")
    if not lines:
        return []
    return ["## Loss gap to the reference width (loss_gap.png)", "",
            f"ΔL_N = L_N - L_ref of the seed-mean probe loss, early (first evaluation after {EARLY_FRAC:.0%} of "
            f"training) and late (final); 95% bootstrap intervals over seeds.", "", *lines, ""]


def summary_json(runs: list[Run]) -> dict:
    return {run.label: fits for run in runs if (fits := gap_fits(run))}
