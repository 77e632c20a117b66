"""Coordinate-check figures: mup-style panels per step, one row per (parameterization, quantity).

    plot_coord_check([result_mup, result_sp], "coord_check.png")   # results of stats.coord.coord_check
    plot_coord_depth([result_mup, result_completep], "coord_check.png")   # of stats.coord.coord_check_depth
    coord_in_loop([run], "coord_in_loop.png")                      # "coord" rows the loop wrote

Each panel: x = width (ticks name the widths), y = RMS, one line per layer. Rows: the whole
activation change |h_t - h_0|, its own-update part (W_t - W_0)·x_t and its input-change part
W_0·(x_t - x_0) (Haas et al. 2025). Flat lines are width-stable; under SP the own-update part of
hidden and output layers grows with width.

Across depth: one column per layer every depth has, rows update RMS (h_T - h_0) and activation
RMS at init against depth, one line per parameterization. Flat lines are depth-stable.
"""
from __future__ import annotations

from pathlib import Path

from fastwidth.report.reader import Run

ROWS = (("delta_rms", "RMS of h_t - h_0"), ("own_rms", "own update (W_t - W_0)·x_t"),
        ("input_rms", "input change W_0·(x_t - x_0)"))


def _layer_colors(names):
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("tab20")
    return {n: cmap(i % 20) for i, n in enumerate(names)}


def _panel(ax, widths, series: dict[str, list[float]], colors, title: str) -> None:
    from fastwidth.report._plotbase import _width_ticks
    for name, ys in series.items():
        pts = [(w, y) for w, y in zip(widths, ys) if y is not None and y > 0]
        if pts:
            ax.plot(*zip(*pts), "-o", ms=3, lw=1, color=colors[name], label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _width_ticks(ax, widths)
    ax.set_xlabel("width")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=8)


def plot_coord_check(results: list[dict], path: Path) -> Path:
    """Rows: (result, quantity); columns: steps 1..T."""
    import matplotlib.pyplot as plt
    from fastwidth.report._plotbase import _save
    steps = max(r["steps"] for r in results)
    names = list(dict.fromkeys(n for r in results for n in r["layers"]))
    colors = _layer_colors(names)
    fig, axes = plt.subplots(len(ROWS) * len(results), steps, figsize=(3.4 * steps + 2.2, 2.7 * len(ROWS) * len(results)),
                             squeeze=False)
    for i, res in enumerate(results):
        for j, (q, label) in enumerate(ROWS):
            for t in range(steps):
                series = {n: [None if v is None else v[t] for v in layer["by_step"][q]]
                          for n, layer in res["layers"].items()}
                _panel(axes[len(ROWS) * i + j][t], res["widths"], series, colors,
                       f"{res['arch']} {res['kind']} {res['optim']}: {label}, step {t + 1}")
    axes[0][-1].legend(fontsize=5, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, path)


DEPTH_ROWS = (("update_rms", "update RMS |h_T - h_0|"), ("act_rms", "activation RMS at init"))


def plot_coord_depth(results: list[dict], path: Path) -> Path:
    """Columns: the layers of stats.coord.coord_check_depth's results; rows: DEPTH_ROWS; one line per kind."""
    import matplotlib.pyplot as plt
    from fastwidth.report._plotbase import _loglog_axes, _save, min_log_span
    names = list(dict.fromkeys(n for r in results for n in r["layers"]))
    fig, axes = plt.subplots(len(DEPTH_ROWS), len(names), figsize=(3.4 * len(names) + 0.6, 2.9 * len(DEPTH_ROWS)),
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    for j, name in enumerate(names):
        for i, (q, label) in enumerate(DEPTH_ROWS):
            ax = axes[i][j]
            for k, res in enumerate(results):
                ys = res["layers"].get(name, {}).get(q, [])
                pts = [(d, y) for d, y in zip(res["depths"], ys) if y is not None and y > 0]
                if pts:
                    ax.plot(*zip(*pts), "-o", ms=3, color=cmap(k), label=res["kind"])
            if not ax.lines:   # e.g. the zero-initialized readout's output at init
                ax.text(0.5, 0.5, "0 at every depth", transform=ax.transAxes, ha="center", fontsize=8)
            _loglog_axes(ax, [d for r in results for d in r["depths"]], xlabel="depth L")
            if ax.lines:
                min_log_span(ax)
            ax.set_title(f"{name}: {label}", fontsize=8)
    r0 = results[0]
    fig.suptitle(f"{r0['arch']} width {r0['width']}, {r0['optim']}, {r0['steps']} steps, base depth {r0['base_depth']}",
                 fontsize=9)
    axes[0][-1].legend(fontsize=6)
    return _save(fig, path)


def coord_in_loop(runs: list[Run], path: Path) -> Path | None:
    """The refined check the loop ran at stats.coord_every: last measured step, per run and quantity."""
    import matplotlib.pyplot as plt
    from fastwidth.report._plotbase import _save
    found = [(run, [r for r in run.rows("coord")]) for run in runs]
    found = [(run, rows) for run, rows in found if rows]
    if not found:
        return None
    fig, axes = plt.subplots(len(found), len(ROWS), figsize=(3.8 * len(ROWS) + 2, 3.0 * len(found)), squeeze=False)
    for i, (run, rows) in enumerate(found):
        step = max(r["step"] for r in rows)
        last = [r for r in rows if r["step"] == step]
        seed0 = min(r["seed"] for r in last)
        by_w = {r["width"]: r["layers"] for r in last if r["seed"] == seed0}
        widths = sorted(by_w)
        names = list(dict.fromkeys(n for layers in by_w.values() for n in layers))
        colors = _layer_colors(names)
        for j, (q, label) in enumerate(ROWS):
            series = {n: [by_w[w].get(n, {}).get(q) for w in widths] for n in names}
            _panel(axes[i][j], widths, series, colors, f"{run.label}: {label}, step {step}")
        axes[i][-1].legend(fontsize=5, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, path)
