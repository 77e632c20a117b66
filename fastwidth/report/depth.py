"""A depth sweep (sweep.depths) read across depth: at each width, every depth against the reference depth.

    nums = depth_numbers(run)     # per width: per depth RMSE, V_L, bias with intervals; the fit rows
    consistency_depth([run], "consistency_depth.png"); variance_depth(...); bias_depth(...)

Rows (DESIGN §5): in a depth sweep every per-member row carries `depth`; consistency, ensemble and
fit rows carry "axis": "width" (across width at one depth) or "axis": "depth" (across depth at one
width: width, depth, ref_depth, ref_width = width). The width figures read the reference depth's
rows (reader.at_reference_depth); these read the axis-depth rows of `run.depth_rows` (one learning
rate, diverged members left out, as the width figures).

Numbers per (width, depth): the late true-logit RMSE against the same-seed reference-depth model
(mean over the last 25% of tokens of the seed mean, report/intervals.py: bootstrap over seeds),
and from the final ensemble rows V_L (one model's seed variance of the true logit), the raw bias
and the debiased bias², each with the interval the loop wrote (null where it wrote none); at the last
evaluation the mean CKA (layers matched by relative depth) and preactivation W1 (final block).
Fits: the final axis-depth fit row of each width (slopes of the log quantity against log depth,
the bias model with depth in the width's place; bootstrap over seeds).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fastwidth.report._plotbase import _loglog_axes, _save, plt
from fastwidth.report.intervals import late_rmse_with_ci, with_interval
from fastwidth.report.reader import FIT_KEYS, Run
from fastwidth.report.transfer import transfer_depth

ENSEMBLE_KEYS = ("seed_variance", "bias", "bias_sq_debiased")
LAYER_KEYS = ("cka", "preact_w1")   # {layer: value} in the consistency rows


def is_depth_sweep(run: Run) -> bool:
    return len(run.depths) > 1


def across_depth(run: Run, kind: str) -> list[dict]:
    """The rows of `kind` across depth (`"axis": "depth"`), live consistency only."""
    return [r for r in run.depth_rows if r.get("kind") == kind and r.get("axis") == "depth"
            and r.get("ref", "live") == "live"]


def _final(rows: list[dict]) -> list[dict]:
    step = max((r["step"] for r in rows), default=None)
    return [r for r in rows if r["step"] == step]


def _final_layer_means(rows: list[dict]) -> dict[tuple, float]:
    """{(width, depth, key): mean over seeds and layers} of LAYER_KEYS at the last consistency step
    (CKA of the layers matched by relative depth; W1 of the final block's preactivations)."""
    acc: dict[tuple, list[float]] = {}
    for r in _final(rows):
        for k in LAYER_KEYS:
            vals = [v for v in (r.get(k) or {}).values() if isinstance(v, (int, float)) and math.isfinite(v)]
            if vals:
                acc.setdefault((r["width"], r["depth"], k), []).append(sum(vals) / len(vals))
    return {key: sum(v) / len(v) for key, v in acc.items()}


def depth_numbers(run: Run) -> dict | None:
    """{"reference_depth", "depths", "widths": [{"width", "depths": [{"depth", "reference", "final_loss",
    "true_logit_rmse", "true_logit_rmse_ci", "cka", "preact_w1", "seed_variance", "seed_variance_ci", "bias",
    "bias_ci", "bias_sq_debiased", "bias_sq_debiased_ci"}], "fit": {rmse_slope, rmse_slope_ci, variance_slope,
    ..., the bias model's fields, "step"}}]}; None outside a depth sweep."""
    if not is_depth_sweep(run):
        return None
    consistency = across_depth(run, "consistency")
    rmse = late_rmse_with_ci(run, rows=consistency, by=("width", "depth"))
    layer_means = _final_layer_means(consistency)
    ens = {(r["width"], r["depth"]): r for r in _final(across_depth(run, "ensemble"))}
    fits = {r["width"]: r for r in _final(across_depth(run, "fit"))}
    evals = [r for r in run.depth_rows if r.get("kind") == "eval" and isinstance(r.get("probe_loss"), (int, float))]
    last = max((r["step"] for r in evals), default=None)
    widths = []
    for w in run.widths:
        rows = []
        for d in run.depths:
            e = ens.get((w, d), {})
            loss = [r["probe_loss"] for r in evals if r["step"] == last and r["width"] == w and r.get("depth") == d]
            value, ci = rmse.get((w, d), (None, None))
            rows.append({"depth": d, "reference": d == run.ref_depth,
                         "final_loss": sum(loss) / len(loss) if loss else None,
                         "true_logit_rmse": value, "true_logit_rmse_ci": ci,
                         **{k: layer_means.get((w, d, k)) for k in LAYER_KEYS},
                         **{k: e.get(k) for k in ENSEMBLE_KEYS}, **{f"{k}_ci": e.get(f"{k}_ci") for k in ENSEMBLE_KEYS}})
        f = fits.get(w, {})
        fit = {k: f.get(k) for k in FIT_KEYS} | {f"{k}_ci": f.get(f"{k}_ci") for k in FIT_KEYS}
        widths.append({"width": w, "depths": rows, "fit": {**fit, "step": f.get("step")}})
    return {"reference_depth": run.ref_depth, "depths": run.depths, "widths": widths}


# ------------------------------------------------------------------------------ summary.md

def _v(value, ci=None, fmt=".4g") -> str:
    return with_interval(value, ci, fmt)


def depth_lines(runs: list[Run]) -> list[str]:
    """summary.md's section across depth: per run and width a table by depth, and the fitted slopes."""
    lines = []
    for run in runs:
        nums = depth_numbers(run)
        if nums is None:
            continue
        lines += [f"## Across depth: {run.label}", "",
                  f"Each depth against the reference depth {nums['reference_depth']} at the same width; "
                  "intervals 95% bootstrap over seeds (– where none).", ""]
        for w in nums["widths"]:
            f = w["fit"]
            lines += [f"Width {w['width']}: slopes against log depth: RMSE {_v(f['rmse_slope'], f['rmse_slope_ci'], '+.3f')}, "
                      f"V_L {_v(f['variance_slope'], f['variance_slope_ci'], '+.3f')}, "
                      f"bias {_v(f['bias_slope'], f['bias_slope_ci'], '+.3f')}", "",
                      "| depth | probe loss | late RMSE vs ref depth [95%] | mean CKA | final block's preact W1 "
                      "| V_L [95%] | bias (raw) | debiased bias² [95%] |", "|---:|---:|---|---:|---:|---|---|---|"]
            for r in w["depths"]:
                lines.append(f"| {r['depth']}{' (ref)' if r['reference'] else ''} | {_v(r['final_loss'])} | "
                             f"{_v(r['true_logit_rmse'], r['true_logit_rmse_ci'])} | {_v(r['cka'])} | {_v(r['preact_w1'])} | "
                             f"{_v(r['seed_variance'], r['seed_variance_ci'])} | {_v(r['bias'], r['bias_ci'])} | "
                             f"{_v(r['bias_sq_debiased'], r['bias_sq_debiased_ci'])} |")
            lines.append("")
    return lines


# ------------------------------------------------------------------------------ figures

def _depth_colors(depths: list[int]) -> dict[int, tuple]:
    cmap = plt.get_cmap("plasma")
    n = max(len(depths) - 1, 1)
    return {d: cmap(0.85 * i / n) for i, d in enumerate(sorted(depths))}


def _slope_line(ax, pts: list[tuple[int, float]], slope: float | None, color, label: str) -> None:
    """The line of the fitted `slope` through the points' geometric mean (least squares given the slope)."""
    if slope is None or not math.isfinite(slope) or len(pts) < 2:
        return
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    xs = np.array([min(p[0] for p in pts), max(p[0] for p in pts)], float)
    ax.plot(xs, np.exp(y.mean() - slope * x.mean()) * xs ** slope, "--", color=color, lw=1, label=label)


def consistency_depth(runs: list[Run], path: Path) -> Path | None:
    """Per (run, width): the cross-depth true-logit RMSE against steps, one line per depth (seed
    mean); last column: the late RMSE against depth with its interval and the fitted slope."""
    found = [(run, w) for run in runs if is_depth_sweep(run) for w in run.widths
             if any(r["width"] == w for r in across_depth(run, "consistency"))]
    if not found:
        return None
    fig, axes = plt.subplots(len(found), 2, figsize=(10.4, 3.6 * len(found)), squeeze=False)
    for (run, w), (ax, ax_late) in zip(found, axes):
        rows = [r for r in across_depth(run, "consistency") if r["width"] == w
                and isinstance(r.get("true_logit_rmse"), (int, float))]
        colors = _depth_colors(run.depths)
        for d in sorted({r["depth"] for r in rows}):
            by_step: dict[int, list[float]] = {}
            for r in rows:
                if r["depth"] == d:
                    by_step.setdefault(r["step"], []).append(r["true_logit_rmse"])
            steps = sorted(by_step)
            ax.plot(steps, [np.mean(by_step[s]) for s in steps], "-o", ms=3, color=colors[d], label=f"L={d}")
        ax.set_xlabel("step")
        ax.set_ylabel("true-logit RMSE vs reference depth")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"{run.label}, width {w}: against depth {run.ref_depth} (same seed)", fontsize=8)
        ax.legend(fontsize=6)
        ws = next(x for x in depth_numbers(run)["widths"] if x["width"] == w)
        _errorbars(ax_late, ws["depths"], "true_logit_rmse", "tab:blue")
        fit = ws["fit"]
        _slope_line(ax_late, _points(ws["depths"], "true_logit_rmse"), fit["rmse_slope"], "tab:blue",
                    f"slope {_v(fit['rmse_slope'], fit['rmse_slope_ci'], '+.2f')}")
        _loglog_axes(ax_late, run.depths, xlabel="depth L")
        ax_late.set_title("late RMSE (last 25% of tokens) vs depth [95%]", fontsize=8)
        if ax_late.get_legend_handles_labels()[0]:
            ax_late.legend(fontsize=6)
    return _save(fig, path)


def _points(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["depth"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] > 0]


def _errorbars(ax, rows: list[dict], key: str, color, label: str | None = None) -> None:
    pts = [r for r in rows if isinstance(r.get(key), (int, float)) and r[key] > 0]
    if not pts:
        return
    y = np.array([r[key] for r in pts])
    ci = [r.get(f"{key}_ci") or [r[key], r[key]] for r in pts]
    err = [np.maximum(y - [c[0] for c in ci], 0), np.maximum(np.array([c[1] for c in ci]) - y, 0)]
    ax.errorbar([r["depth"] for r in pts], y, yerr=err, fmt="o", ms=5, capsize=3, color=color, label=label)


def _per_width_panels(runs: list[Run], path: Path, panels: list[tuple[str, str, str | None]]) -> Path | None:
    """One row per depth sweep, one column per (key, title, fitted slope key): the final axis-depth
    ensemble numbers against depth per width, with intervals and the fitted slope."""
    found = [(run, depth_numbers(run)) for run in runs if is_depth_sweep(run)]
    found = [(run, n) for run, n in found if any(_points(w["depths"], k) for w in n["widths"] for k, _, _ in panels)]
    if not found:
        return None
    fig, axes = plt.subplots(len(found), len(panels), figsize=(5.0 * len(panels) + 0.6, 3.8 * len(found)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for (run, nums), row in zip(found, axes):
        for ax, (key, title, slope_key) in zip(row, panels):
            for i, w in enumerate(nums["widths"]):
                color = cmap(0.9 * i / max(len(nums["widths"]) - 1, 1))
                _errorbars(ax, w["depths"], key, color, f"N={w['width']}")
                if slope_key:
                    fit = w["fit"]
                    _slope_line(ax, _points(w["depths"], key), fit[slope_key], color,
                                f"N={w['width']} slope {_v(fit[slope_key], fit[f'{slope_key}_ci'], '+.2f')}")
            _loglog_axes(ax, run.depths, xlabel="depth L")
            ax.set_title(f"{run.label}: {title}", fontsize=8)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    return _save(fig, path)


def variance_depth(runs: list[Run], path: Path) -> Path | None:
    """V_L (one model's seed variance of the true logit) against depth, the fitted slope and interval."""
    return _per_width_panels(runs, path, [("seed_variance", "seed variance V_L vs depth [95%]", "variance_slope")])


def bias_depth(runs: list[Run], path: Path) -> Path | None:
    """The ensemble bias against the reference depth (raw, with the fitted slope) and the debiased bias²."""
    return _per_width_panels(runs, path, [("bias", "ensemble bias (raw) vs depth", "bias_slope"),
                                          ("bias_sq_debiased", "debiased bias² vs depth [95%]", None)])


FIGURES = {"consistency_depth.png": consistency_depth, "variance_depth.png": variance_depth,
           "bias_depth.png": bias_depth, "transfer_depth.png": transfer_depth}
