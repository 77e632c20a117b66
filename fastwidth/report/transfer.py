"""µTransfer: loss against learning rate per width, each width's optimum, and the optimum's drift.

    curves = lr_curves(run, tokens)              # {width: {lr: [loss per seed], inf = diverged}}
    fit = drift(run, tokens)                     # slope of log η* on log N, bootstrap interval over seeds
    loss_vs_lr([run_mup, run_sp], "loss_vs_lr.png")

The loss of a member at a token budget T is the mean training loss over the rows with tokens in
(T - W, T], W = 10% of the run's tokens. Each training batch is new data (online), so the loss a
step reports, computed before the step, is a held-out estimate; the window averages batch noise.

Optimum. For width N the seed-mean loss L_N(η) is known on the grid of sweep.lrs. η*_N is the
vertex of the parabola through the grid minimum and its two neighbours in log η (a sub-grid
estimate; clipped to the neighbours' span). At the edge of the grid, or next to a diverged
learning rate, the parabola is one-sided and η*_N is the grid point (flagged "edge").

Drift. slope = least-squares slope of log η*_N on log N: ≈ 0 when the optimum transfers (µP),
negative when it falls with width (SP with Adam: ≈ -1 for hidden layers). Interval: percentile
bootstrap (2.5%, 97.5%) over seeds, resampling each width's seeds with replacement (one draw of
seed indices shared by all learning rates of that width, as a seed fixes the init). With S seeds
a width has only S^S distinct resamples, so with 2 seeds the interval is coarse and says more
about init noise than about the grid. A member that diverged counts as loss +inf at its learning
rate (worse than any finite loss), so a diverged lr is never the optimum.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from fastwidth.report.reader import Run, progress_word, stopped_note

WINDOW = 0.1       # fraction of the run's tokens averaged at each budget
BUDGETS = (0.25, 0.5, 1.0)
N_BOOT = 400


def sweep_label(run: Run) -> str:
    """The run's label without the learning rate the per-width figures picked."""
    return run.label.rsplit(" lr=", 1)[0]


def max_tokens(run: Run) -> int:
    return max((r["tokens"] for r in run.sweep_rows if r.get("kind") == "train"), default=0)


def lr_curves(run: Run, tokens: int) -> dict[int, dict[float, dict[int, float]]]:
    """{width: {lr: {seed: loss at `tokens`}}}; a member stopped before `tokens` has loss inf."""
    window = WINDOW * max_tokens(run)
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in run.sweep_rows:
        if r.get("kind") == "train" and r.get("base_lr") is not None and isinstance(r.get("loss"), (int, float)):
            if tokens - window < r["tokens"] <= tokens:
                acc[r["width"]][r["base_lr"]][r["seed"]].append(r["loss"])
    out = {w: {lr: {s: sum(v) / len(v) for s, v in seeds.items()} for lr, seeds in by_lr.items()}
           for w, by_lr in acc.items()}
    for r in run.diverged:
        if r["tokens"] <= tokens:  # stopped by then: it has no loss at this budget or any later one
            out.setdefault(r["width"], {}).setdefault(r["base_lr"], {})[r["seed"]] = math.inf
    return {w: dict(sorted(d.items())) for w, d in sorted(out.items())}


def optimum(lrs: list[float], losses: list[float]) -> tuple[float, bool]:
    """(η*, at_edge): the parabolic vertex in log η through the grid minimum and its neighbours."""
    y = np.asarray(losses, float)
    if not np.isfinite(y).any():
        return math.nan, True
    x = np.log(np.asarray(lrs, float))
    i = int(np.nanargmin(np.where(np.isfinite(y), y, np.inf)))
    if i == 0 or i == len(x) - 1 or not (np.isfinite(y[i - 1]) and np.isfinite(y[i + 1])):
        return float(lrs[i]), True
    (x0, x1, x2), (y0, y1, y2) = x[i - 1:i + 2], y[i - 1:i + 2]
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    if den == 0:
        return float(lrs[i]), False
    xv = x1 - 0.5 * ((x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)) / den
    return float(math.exp(min(max(xv, x0), x2))), False


def _optima(curves: dict, pick=None) -> dict[int, tuple[float, bool]]:
    """{width: (η*, at_edge)} from seed means; `pick` maps width -> seed list (a bootstrap draw)."""
    out = {}
    for w, by_lr in curves.items():
        lrs = sorted(by_lr)
        seeds = sorted({s for d in by_lr.values() for s in d})
        use = pick[w] if pick else seeds
        means = []
        for lr in lrs:
            vals = [by_lr[lr].get(s, math.nan) for s in use]
            means.append(math.inf if any(v == math.inf for v in vals) else float(np.nanmean(vals)))
        if len(lrs) >= 2:
            out[w] = optimum(lrs, means)
    return out


def _slope(opt: dict[int, tuple[float, bool]]) -> float:
    pts = [(w, lr) for w, (lr, _) in opt.items() if math.isfinite(lr) and lr > 0]
    if len(pts) < 2:
        return math.nan
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def drift(run: Run, tokens: int, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """{"optima": {w: η*}, "edge": {w: bool}, "slope", "ci": [lo, hi], "tokens"} at the budget `tokens`."""
    curves = lr_curves(run, tokens)
    opt = _optima(curves)
    seeds = {w: sorted({s for d in by_lr.values() for s in d}) for w, by_lr in curves.items()}
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        pick = {w: list(rng.choice(s, size=len(s), replace=True)) for w, s in seeds.items()}
        boot.append(_slope(_optima(curves, pick)))
    boot = [b for b in boot if math.isfinite(b)]
    ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot else [math.nan, math.nan]
    return {"tokens": tokens, "optima": {w: v[0] for w, v in opt.items()}, "edge": {w: v[1] for w, v in opt.items()},
            "slope": _slope(opt), "ci": ci, "seeds": max((len(s) for s in seeds.values()), default=0)}


def budgets(run: Run) -> list[int]:
    """Token budgets drawn: fractions BUDGETS of the run, snapped to logged train rows."""
    logged = sorted({r["tokens"] for r in run.sweep_rows if r.get("kind") == "train"})
    if not logged:
        return []
    return sorted({min(logged, key=lambda t: abs(t - f * logged[-1])) for f in BUDGETS})


def _draw_panel(ax, run: Run, tokens: int, colors) -> dict:
    curves, fit = lr_curves(run, tokens), drift(run, tokens)
    finite = [np.mean([v for v in d.values() if math.isfinite(v)]) for by_lr in curves.values()
              for d in by_lr.values() if any(math.isfinite(v) for v in d.values())]
    top = max(finite) * 1.05 if finite else 1.0
    for w, by_lr in curves.items():
        lrs = sorted(by_lr)
        means = [np.mean(list(by_lr[lr].values())) for lr in lrs]
        ok = [(lr, m) for lr, m in zip(lrs, means) if math.isfinite(m)]
        if ok:
            ax.plot(*zip(*ok), "-o", ms=3, color=colors.get(w), label=f"N={w}")
        bad = [lr for lr, m in zip(lrs, means) if not math.isfinite(m)]
        if bad:
            ax.plot(bad, [top] * len(bad), "x", ms=7, color=colors.get(w))
        lr_star = fit["optima"].get(w)
        if lr_star is not None and math.isfinite(lr_star) and ok:
            y_star = np.interp(math.log(lr_star), np.log([p[0] for p in ok]), [p[1] for p in ok])
            ax.plot([lr_star], [y_star], "*", ms=13, mec="black", mew=0.6, color=colors.get(w))
    ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("base learning rate η")
    lo, hi = fit["ci"]
    ax.set_title(f"{sweep_label(run)}: {progress_word(run)} {tokens}\nlog η* vs log N slope {fit['slope']:+.2f} "
                 f"[{lo:+.2f}, {hi:+.2f}] (x: diverged, *: optimum)", fontsize=8)
    return fit


def _draw_drift(ax, runs: list[Run], fits: list[dict]) -> None:
    import matplotlib.pyplot as plt
    from fastwidth.report._plotbase import _width_ticks
    cmap = plt.get_cmap("tab10")
    for i, (run, fit) in enumerate(zip(runs, fits)):
        pts = sorted((w, lr) for w, lr in fit["optima"].items() if math.isfinite(lr))
        if not pts:
            continue
        ws, lrs = zip(*pts)
        ax.plot(ws, lrs, "o", color=cmap(i), ms=6)
        edge = [(w, lr) for w, lr in pts if fit["edge"].get(w)]
        if edge:
            ax.plot(*zip(*edge), "o", mfc="none", mec="red", ms=10)
        if math.isfinite(fit["slope"]):
            b = np.polyfit(np.log(ws), np.log(lrs), 1)
            xs = np.array([min(ws), max(ws)], float)
            lo, hi = fit["ci"]
            ax.plot(xs, np.exp(b[1]) * xs ** b[0], "-", color=cmap(i),
                    label=f"{sweep_label(run)}: {fit['slope']:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _width_ticks(ax, [w for f in fits for w in f["optima"]])
    ax.set_xlabel("width N")
    ax.set_ylabel("optimal η* (end of training)")
    ax.set_title("optimum drift: slope of log η* on log N\n(red ring: at the grid's edge)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)


def loss_vs_lr(runs: list[Run], path: Path) -> Path | None:
    """Rows: runs with sweep.lrs; columns: token budgets, and the optimum's drift at the end."""
    import matplotlib.pyplot as plt
    from fastwidth.report._plotbase import _save, width_colors
    runs = [r for r in runs if r.lrs and budgets(r)]
    if not runs:
        return None
    n_cols = max(len(budgets(r)) for r in runs) + 1
    fig, axes = plt.subplots(len(runs), n_cols, figsize=(4.2 * n_cols, 3.6 * len(runs)), squeeze=False)
    end_fits = []
    for row, run in enumerate(runs):
        colors = width_colors(run.widths)
        fits = [_draw_panel(axes[row][j], run, t, colors) for j, t in enumerate(budgets(run))]
        end_fits.append(fits[-1])
        axes[row][0].set_ylabel("training loss (online, window mean)")
        axes[row][0].legend(fontsize=6, title="width", title_fontsize=6)
        for j in range(len(fits), n_cols - 1):
            axes[row][j].axis("off")
        if row:
            axes[row][-1].axis("off")
    _draw_drift(axes[0][-1], runs, end_fits)
    return _save(fig, path)


def transfer_lines(runs: list[Run]) -> list[str]:
    """summary.md lines: members left out for divergence, and each sweep's optimum and drift."""
    lines = [line for run in runs for line in stopped_note(run)]
    sweeps = [r for r in runs if r.lrs and budgets(r)]
    if not sweeps:
        return lines
    lines += ["## Learning-rate transfer", "",
              "| run | seen | η* per width (sub-grid; * = at the grid's edge) | slope of log η* on log N [95% bootstrap] |",
              "|---|---:|---|---|"]
    for run in sweeps:
        for t in budgets(run):
            fit = drift(run, t)
            opts = ", ".join(f"{w}: {lr:.3g}{'*' if fit['edge'][w] else ''}" for w, lr in fit["optima"].items())
            lo, hi = fit["ci"]
            lines.append(f"| {sweep_label(run)} | {t} {progress_word(run)} | {opts} | {fit['slope']:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                         f"({fit['seeds']} seeds) |")
    return lines + [""]
