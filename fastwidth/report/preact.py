"""Preactivation statistics in the report: the histograms' out-of-range share, and W1 and kurtosis
against width with 95% intervals over seeds.

    d = preact_numbers(run)          # final eval: per layer out_of_range, per width W1 / kurtosis
    lines = preact_lines(runs)       # summary.md tables
    preact_vs_width(runs, path)      # the figure (FIGURES["preact_vs_width.png"])

Estimators, all at the final evaluation, over the seeds of each width:
- out_of_range: share of a layer's training-batch preactivations (the histogram's sample) in the
  two overflow bins (stats/preact_range.py); the largest over members at the final eval, and the
  largest over every eval of training with where it happened. A count, no interval.
- W1 / σ_ref (consistency rows' preact_w1_std): the binned 1-Wasserstein distance between a member's
  histogram and the same seed's reference-width member's, over that reference member's std. The
  value is the mean over seeds; its interval a basic bootstrap over seeds (stats.ensemble's
  tail_mean_ci, none with fewer than MIN_SEEDS_CI seeds). Two sampled histograms are never equal,
  so W1 is biased up, by the histograms' sampling noise and the seeds' own spread: the floor
  printed beside it is the same statistic between two seeds of the reference width (mean over
  seed pairs), what W1 reads where the widths agree.
- kurtosis: the excess kurtosis of a layer's training-batch preactivations (eval rows), mean over
  seeds, same interval.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np

from fastwidth.report._plotbase import _save, _width_ticks, plt
from fastwidth.report.intervals import with_interval
from fastwidth.report.reader import Run
from fastwidth.stats.ensemble import tail_mean_ci
from fastwidth.stats.metrics import wasserstein1_binned
from fastwidth.stats.preact_range import Bins


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def out_of_range_numbers(run: Run) -> dict[str, dict]:
    """{layer: {final, worst, worst_at: (step, width, seed)}} from the eval rows' preact."""
    rows = [r for r in run.rows("eval") if r.get("preact")]
    if not rows:
        return {}
    last = max(r["step"] for r in rows)
    out: dict[str, dict] = {}
    for r in rows:
        for layer, q in r["preact"].items():
            v = q.get("out_of_range")
            if not _finite(v):
                continue
            d = out.setdefault(layer, {"final": None, "worst": -1.0, "worst_at": None})
            if v > d["worst"]:
                d["worst"], d["worst_at"] = v, (r["step"], r["width"], r["seed"])
            if r["step"] == last:
                d["final"] = v if d["final"] is None else max(d["final"], v)
    return out


def _seed_mean_ci(values: list[float]) -> tuple[float, list | None]:
    return tail_mean_ci(np.asarray(values, dtype=np.float64)[:, None]) if values else (math.nan, None)


def _w1_floor(run: Run, step: int) -> dict[str, float]:
    """{layer: mean over the reference width's seed pairs of W1 / σ} at `step` (the same-width floor)."""
    seeds = sorted({r["seed"] for r in run.rows("eval", width=run.ref_width, step=step)})
    sigs = [run.signature(run.member_name(run.ref_width, s), step) for s in seeds]
    sigs = [s for s in sigs if s]
    got: dict[str, list[float]] = {}
    for (a, meta), (b, _) in itertools.combinations(sigs, 2):
        ranges = meta.get("hist_ranges") or {}
        for key in (k for k in a if k.startswith("preact_hist/") and k in b):
            layer = key.split("/", 1)[1]
            var = float(b[f"preact/{layer}"][2])
            if layer not in ranges or not var > 0:
                continue
            w1 = wasserstein1_binned(a[key], b[key], Bins.of(ranges[layer]).centers(a[key].numel()))
            got.setdefault(layer, []).append(w1 / math.sqrt(var))
    return {l: float(np.mean(v)) for l, v in got.items()}


def preact_numbers(run: Run) -> dict | None:
    """Final-eval W1 / σ_ref and excess kurtosis per width and layer (value, 95% CI), the W1 floor
    and out_of_range; None when the run holds no preactivation rows."""
    oor = out_of_range_numbers(run)
    if not oor:
        return None
    step = max(r["step"] for r in run.rows("eval") if r.get("preact"))
    layers = sorted(oor)
    widths = []
    for w in run.widths:
        ev = run.rows("eval", width=w, step=step)
        cons = run.rows("consistency", ref="live", width=w, step=step)
        kurt = {l: _seed_mean_ci([r["preact"][l]["kurt"] for r in ev
                                  if _finite((r.get("preact") or {}).get(l, {}).get("kurt"))]) for l in layers}
        w1 = {l: _seed_mean_ci([r["preact_w1_std"][l] for r in cons
                                if _finite((r.get("preact_w1_std") or {}).get(l))]) for l in layers}
        widths.append({"width": w, "seeds": len(ev), "kurt": kurt, "w1_std": w1})
    return {"step": step, "layers": layers, "out_of_range": oor, "widths": widths, "floor": _w1_floor(run, step)}


def _vci(v: tuple[float, list | None], fmt: str) -> str:
    return with_interval(*v, fmt)


def preact_lines(runs: list[Run]) -> list[str]:
    """summary.md: out_of_range per layer, then W1 / σ_ref and kurtosis per width and layer."""
    out = []
    for run in runs:
        d = preact_numbers(run)
        if d is None:
            continue
        out += [f"Preactivation histograms of {run.label} (training batches; stats/preact_range.py): share "
                "out of range per layer, the largest over members at the final eval (step "
                f"{d['step']}) and over every eval:", "", "| layer | final | worst over training | at (step, width, seed) |",
                "|---|---:|---:|---|"]
        for l in d["layers"]:
            o = d["out_of_range"][l]
            out.append(f"| {l} | {o['final']:.2e} | {o['worst']:.2e} | {o['worst_at'] if o['worst'] > 0 else '–'} |")
        out += ["", f"W1 to the same seed's width-{run.ref_width} histogram over that member's std (floor: between "
                "two reference seeds), and excess kurtosis, at the final eval: mean over seeds [95% bootstrap "
                "interval over seeds]:", "", "| width | " + " | ".join(f"W1/σ {l}" for l in d["layers"]) + " | "
                + " | ".join(f"kurt {l}" for l in d["layers"]) + " |", "|---:|" + "---:|" * (2 * len(d["layers"]))]
        for r in d["widths"]:
            w1 = [("floor " + (f"{d['floor'][l]:.3f}" if l in d["floor"] else "–")) if r["width"] == run.ref_width
                  else _vci(r["w1_std"][l], ".3f") for l in d["layers"]]
            out.append(f"| {r['width']}{' (ref)' if r['width'] == run.ref_width else ''} | " + " | ".join(w1) + " | "
                       + " | ".join(_vci(r["kurt"][l], ".2f") for l in d["layers"]) + " |")
        out.append("")
    return out


def _with_bars(ax, xs, vals, color, label, marker="o"):
    pts = [(x, v, ci) for x, (v, ci) in zip(xs, vals) if math.isfinite(v)]
    if not pts:
        return
    x, v, ci = zip(*pts)
    lo = [val - c[0] if c else 0.0 for val, c in zip(v, ci)]
    hi = [c[1] - val if c else 0.0 for val, c in zip(v, ci)]
    ax.errorbar(x, v, yerr=[lo, hi], fmt=f"-{marker}", color=color, ms=4, capsize=3, lw=1.1, label=label)


def preact_vs_width(runs: list[Run], path: Path) -> Path | None:
    """Per run: W1 / σ_ref against width per layer (bars: 95% over seeds; dashed: the two-seed
    floor at the reference width) and the excess kurtosis against width per layer."""
    found = [(run, preact_numbers(run)) for run in runs]
    found = [(r, d) for r, d in found if d]
    if not found:
        return None
    fig, axes = plt.subplots(len(found), 2, figsize=(10.5, 3.8 * len(found)), squeeze=False)
    colors = plt.get_cmap("tab10")
    for (run, d), (ax_w, ax_k) in zip(found, axes):
        narrow = [r for r in d["widths"] if r["width"] != run.ref_width]
        for i, l in enumerate(d["layers"]):
            _with_bars(ax_w, [r["width"] for r in narrow], [r["w1_std"][l] for r in narrow], colors(i), l)
            if l in d["floor"]:
                ax_w.axhline(d["floor"][l], color=colors(i), ls="--", lw=0.8)
            _with_bars(ax_k, [r["width"] for r in d["widths"]], [r["kurt"][l] for r in d["widths"]], colors(i), l)
        ax_w.set_title(f"{run.label}: preact W1 to width {run.ref_width} / σ_ref (step {d['step']};\n"
                       "bars 95% over seeds, dashed: two reference seeds)", fontsize=8)
        ax_k.set_title(f"{run.label}: excess kurtosis of training preactivations (step {d['step']})", fontsize=8)
        for ax in (ax_w, ax_k):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("width N")
            ax.grid(True, which="both", alpha=0.3)
            _width_ticks(ax, run.widths)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        ax_w.set_ylabel("W1 / σ_ref")
        ax_k.set_ylabel("excess kurtosis")
    return _save(fig, path)
