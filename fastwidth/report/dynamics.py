"""Training dynamics across widths: sharpness trajectories against the edge of stability, and the
catapult's loss spike and recovery, from "batch_sharpness" and "train" rows.

    edge_of_stability([run], "edge_of_stability.png")

One column per learning rate (base_lr; in edge units a multiple c of 2/λ0), two rows per run:
the training loss against step (log scale: the catapult's spike and recovery show as a bump), and
the sharpness λ/η against step with each width's edge threshold/η (2/η for gradient descent)
dashed in the width's colour. Under µP the curves of different widths should lie on each other.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from fastwidth.report.reader import Run, at_reference_depth


def _by_lr(run: Run, kind: str) -> dict:
    """{base_lr or None: {width: [(step, row)]}} of the first seed, from the rows the report keeps
    (in a depth sweep, the reference depth's)."""
    rows = [r for r in at_reference_depth(run, run.sweep_rows) if r.get("kind") == kind]
    seed0 = min((r["seed"] for r in rows), default=0)
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["seed"] == seed0:
            out[r.get("base_lr")][r["width"]].append((r["step"], r))
    return {lr: {w: sorted(v, key=lambda t: t[0]) for w, v in sorted(d.items())} for lr, d in out.items()}


def _lr_title(run: Run, lr) -> str:
    unit = run.config.get("optim", {}).get("lr_unit", "absolute")
    if lr is None:
        return run.label
    return f"{run.path.name}: η = {lr:g} × 2/λ0" if unit == "edge" else f"{run.path.name}: η = {lr:g}"


def edge_of_stability(runs: list[Run], path: Path) -> Path | None:
    import matplotlib.pyplot as plt
    from fastwidth.report._plotbase import _save, width_colors
    runs = [r for r in runs if any(x.get("kind") == "batch_sharpness" for x in r.sweep_rows)]
    if not runs:
        return None
    per_run = [(run, _by_lr(run, "batch_sharpness"), _by_lr(run, "train")) for run in runs]
    n_cols = max(len(s) for _, s, _ in per_run)
    fig, axes = plt.subplots(2 * len(runs), n_cols, figsize=(4.3 * n_cols, 3.2 * 2 * len(runs)), squeeze=False)
    for i, (run, sharp, train) in enumerate(per_run):
        colors = width_colors(run.widths)
        stopped = {(r["width"], r.get("base_lr")) for r in run.diverged}
        for j, lr in enumerate(sorted(sharp, key=lambda v: -math.inf if v is None else v)):
            ax_l, ax_s = axes[2 * i][j], axes[2 * i + 1][j]
            for w, pts in train.get(lr, {}).items():
                vals = [(s, r["loss"]) for s, r in pts if isinstance(r.get("loss"), (int, float)) and r["loss"] > 0]
                if vals:
                    ax_l.plot(*zip(*vals), "-", lw=1, color=colors.get(w),
                              label=f"N={w}" + (" (diverged)" if (w, lr) in stopped else ""))
            for w, pts in sharp[lr].items():
                vals = [(s, r["sharpness"]) for s, r in pts if isinstance(r.get("sharpness"), (int, float))]
                edge = [(s, r["edge"]) for s, r in pts if isinstance(r.get("edge"), (int, float))]
                if vals:
                    ax_s.plot(*zip(*vals), "-o", ms=2.5, color=colors.get(w), label=f"N={w}")
                if edge:
                    ax_s.plot(*zip(*edge), "--", lw=1, color=colors.get(w))
            ax_l.set_yscale("log")
            ax_s.set_yscale("log")
            ax_l.set_title(f"{_lr_title(run, lr)}\ntraining loss (catapult: spike, then recovery)", fontsize=8)
            ax_s.set_title("sharpness λ/η on the training batch; dashed: edge (2/η for GD)", fontsize=8)
            for ax in (ax_l, ax_s):
                ax.grid(True, which="both", alpha=0.3)
            ax_s.set_xlabel("step")
            ax_l.legend(fontsize=6)
        for j in range(len(sharp), n_cols):
            axes[2 * i][j].axis("off")
            axes[2 * i + 1][j].axis("off")
    return _save(fig, path)
