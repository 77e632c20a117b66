"""The width slopes over training: the loop's fit rows at every evaluation, with their intervals.

    slopes_over_training([run_mup, run_sp], "slopes_vs_tokens.png")
    one_over_n(run)     # where V_N stops scaling like 1/N: {"holds", "from_step", "from_tokens", ...}
    slope_lines(runs)   # the summary.md sentence for each run

Each fit row (stats/ensemble.py) holds the slopes of log(value) on log(width) at one evaluation
and their 95% bootstrap intervals over seeds: true-logit RMSE (the paper's -0.5 late in
training) and seed variance V_N (1/N gives -1), and the bias model's β² (stats/bias_model.py),
fitted on the debiased ensemble bias of every width, negatives kept.
"""
from __future__ import annotations

import math
from pathlib import Path

from fastwidth.report.reader import Run

PANELS = (("rmse_slope", "slope of log true-logit RMSE on log N", -0.5, "N^-0.5 (paper)"),
          ("variance_slope", "slope of log seed variance V_N on log N", -1.0, "1/N"),
          ("bias_beta_sq", "bias model β² (bias of width N: β|1/N - 1/N_ref|)", 0.0, "no bias"))


def fit_series(run: Run, key: str) -> list[tuple[int, int, float, list | None]]:
    """[(tokens, step, slope, ci)] of the run's fit rows, in order, finite slopes only (t > 0)."""
    out = []
    for r in sorted(run.rows("fit"), key=lambda r: r["step"]):
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and r["tokens"] > 0:
            out.append((r["tokens"], r["step"], float(v), r.get(f"{key}_ci")))
    return out


def one_over_n(run: Run) -> dict | None:
    """Where V_N stops scaling like 1/N: the first evaluation from which every later V_N-slope
    interval excludes -1. None without fit rows that carry intervals."""
    pts = [p for p in fit_series(run, "variance_slope") if p[3]]
    if not pts:
        return None
    covers = [lo <= -1.0 <= hi for _, _, _, (lo, hi) in pts]
    last_cover = max((i for i, c in enumerate(covers) if c), default=-1)
    out = {"evaluations": len(pts), "covering_steps": [p[1] for p, c in zip(pts, covers) if c],
           "final_slope": pts[-1][2], "final_ci": pts[-1][3]}
    if last_cover == len(pts) - 1:
        return {**out, "holds": True, "from_step": None, "from_tokens": None}
    t, step, slope, ci = pts[last_cover + 1]
    return {**out, "holds": False, "from_step": step, "from_tokens": t, "slope_then": slope, "ci_then": ci}


def slope_lines(runs: list[Run]) -> list[str]:
    """summary.md: per run, where the V_N slope's interval stops covering -1."""
    lines = []
    for run in runs:
        got = one_over_n(run)
        if got is None:
            continue
        lo, hi = got["final_ci"]
        if got["holds"]:
            text = (f"V_N ∝ 1/N holds through the final evaluation: its slope {got['final_slope']:+.2f} "
                    f"[{lo:+.2f}, {hi:+.2f}] covers -1")
        elif not got["covering_steps"]:
            text = f"V_N never scales like 1/N here: no evaluation's slope interval covers -1 (final {got['final_slope']:+.2f} [{lo:+.2f}, {hi:+.2f}])"
        else:
            a, b = got["ci_then"]
            text = (f"V_N stops scaling like 1/N at step {got['from_step']} ({got['from_tokens']} tokens): from there on "
                    f"no interval covers -1 ({got['slope_then']:+.2f} [{a:+.2f}, {b:+.2f}] then, "
                    f"{got['final_slope']:+.2f} [{lo:+.2f}, {hi:+.2f}] at the end; covered at steps "
                    f"{', '.join(map(str, got['covering_steps']))})")
        lines.append(f"- {run.label}: {text}.")
    return ["## Width slopes over training (slopes_vs_tokens.png)", "", *lines, ""] if lines else []


def slopes_over_training(runs: list[Run], path: Path) -> Path | None:
    """Three panels (RMSE and V_N slopes, the bias model's β²) against tokens, one line and 95% band per run."""
    import matplotlib.pyplot as plt
    from fastwidth.report._plotbase import _save, _tokens_axis
    if not any(len(fit_series(run, k)) >= 2 for run in runs for k, *_ in PANELS):
        return None
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.0 * len(PANELS), 3.9), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (key, name, guide, guide_label) in zip(axes[0], PANELS):
        for i, run in enumerate(runs):
            pts = fit_series(run, key)
            if not pts:
                continue
            t = [p[0] for p in pts]
            ax.plot(t, [p[2] for p in pts], "-o", ms=3, color=cmap(i), label=run.label)
            band = [(p[0], *p[3]) for p in pts if p[3]]
            if band:
                ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                                color=cmap(i), alpha=0.18, lw=0)
        if guide is not None:
            ax.axhline(guide, color="gray", ls="--", lw=1, label=guide_label)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"{name}\n(band: 95% bootstrap over seeds)", fontsize=9)
        _tokens_axis(ax, runs[0])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("width slope")
    axes[0][2].set_ylabel("β² (logit² width²)")
    return _save(fig, path)
