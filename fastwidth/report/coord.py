"""Coordinate-check figures: mup-style panels per step, one row per (parameterization, quantity).

    plot_coord_check([result_mup, result_sp], "coord_check.png")   # results of stats.coord.coord_check
    plot_coord_depth([result_mup, result_completep], "coord_check.png")   # of stats.coord.coord_check_depth
    coord_in_loop([run], "coord_in_loop.png")                      # "coord" rows the loop wrote: refined, last step
    coord_tp5([run], "coord_tp5.png")                              # the same rows, TP5 style, a few steps
    coord_flatness(run)      # per layer max/min over widths of the update RMS (summary.md, summary.json "paper")

Each panel: x = width (ticks name the widths), y = RMS, one line per layer. Rows: the whole
activation change |h_t - h_0|, its own-update part (W_t - W_0)·x_t and its input-change part
W_0·(x_t - x_0) (Haas et al. 2025). Flat lines are width-stable; under SP the own-update part of
hidden and output layers grows with width.

From a run (stats.coord_every): coord_in_loop draws the refined view above at the last measured
step, coord_tp5 the TP5 one (Yang et al. 2021, fig. 1: activation RMS and its change since init
against width at a few steps, one line per layer); both are seed means. This module is also a
report section (report/sections.py: FIGURES, summary_lines, summary_json) for coord_tp5 and the
flatness numbers; coord_in_loop is drawn from figures.py.

Across depth: one column per layer every depth has, rows update RMS (h_T - h_0) and activation
RMS at init against depth, one line per parameterization. Flat lines are depth-stable.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fastwidth.report.reader import Run
from fastwidth.stats.coord import spread

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


def coord_means(run: Run) -> dict[int, dict[int, dict[str, dict[str, float]]]]:
    """{step: {width: {layer: {quantity: mean over seeds}}}} of the run's "coord" rows."""
    acc: dict = {}
    for r in run.rows("coord"):
        for name, qs in r["layers"].items():
            for q, v in qs.items():
                if isinstance(v, (int, float)):
                    acc.setdefault(r["step"], {}).setdefault(r["width"], {}).setdefault(name, {}).setdefault(q, []).append(v)
    return {t: {w: {n: {q: sum(v) / len(v) for q, v in qs.items()} for n, qs in by_n.items()}
                for w, by_n in sorted(by_w.items())} for t, by_w in sorted(acc.items())}


def _n_seeds(run: Run) -> int:
    return len({r["seed"] for r in run.rows("coord")})


def coord_in_loop(runs: list[Run], path: Path) -> Path | None:
    """The refined check the loop ran at stats.coord_every: last measured step, per run and
    quantity, seed means."""
    import matplotlib.pyplot as plt
    from fastwidth.report._plotbase import _save, min_log_span
    found = [(run, coord_means(run)) for run in runs]
    found = [(run, means) for run, means in found if means]
    if not found:
        return None
    fig, axes = plt.subplots(len(found), len(ROWS), figsize=(3.8 * len(ROWS) + 2, 3.0 * len(found)), squeeze=False)
    for i, (run, means) in enumerate(found):
        step = max(means)
        by_w = means[step]
        widths = sorted(by_w)
        names = list(dict.fromkeys(n for layers in by_w.values() for n in layers))
        colors = _layer_colors(names)
        for j, (q, label) in enumerate(ROWS):
            series = {n: [by_w[w].get(n, {}).get(q) for w in widths] for n in names}
            _panel(axes[i][j], widths, series, colors, f"{run.label}: {label}, step {step}, mean of {_n_seeds(run)} seeds")
            if axes[i][j].lines:
                min_log_span(axes[i][j], 10.0)
            axes[i][j].set_ylabel("RMS over probe examples and units", fontsize=7)
        handles = max((ax.get_legend_handles_labels() for ax in axes[i]), key=lambda hl: len(hl[1]))
        axes[i][-1].legend(*handles, fontsize=5, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, path)


TP5_ROWS = (("act_rms", "activation RMS of h_t"), ("delta_rms", "change RMS of h_t - h_0"))
TP5_STEPS = 4


def pick_steps(steps: list[int], k: int = TP5_STEPS) -> list[int]:
    """Up to k of the measured `steps`, spread evenly in log step from the first to the last (both kept)."""
    steps = sorted(set(steps))
    if len(steps) <= k:
        return steps
    targets = np.geomspace(steps[0], steps[-1], k)
    return sorted({min(steps, key=lambda s: abs(math.log(s / t))) for t in targets} | {steps[0], steps[-1]})


def coord_tp5(runs: list[Run], path: Path) -> Path | None:
    """TP5-style coordinate check from the loop's coord rows: per run, activation RMS and the RMS of
    its change since init against width at a few steps (pick_steps), one line per layer, log-log,
    seed means. Flat lines: width-stable (µP); a line rising with N blows up in the wide limit."""
    import matplotlib.pyplot as plt
    from fastwidth.report._plotbase import _save, min_log_span
    found = [(run, coord_means(run)) for run in runs]
    found = [(run, means, pick_steps([t for t in means if t > 0])) for run, means in found if means]
    if not found:
        return None
    cols = max(len(steps) for *_, steps in found)
    fig, axes = plt.subplots(len(TP5_ROWS) * len(found), cols, figsize=(3.4 * cols + 2.2, 2.7 * len(TP5_ROWS) * len(found)),
                             squeeze=False)
    for i, (run, means, steps) in enumerate(found):
        names = list(dict.fromkeys(n for t in steps for layers in means[t].values() for n in layers))
        colors = _layer_colors(names)
        for j, (q, label) in enumerate(TP5_ROWS):
            row = axes[len(TP5_ROWS) * i + j]
            for t, ax in zip(steps, row):
                widths = sorted(means[t])
                series = {n: [means[t][w].get(n, {}).get(q) for w in widths] for n in names}
                _panel(ax, widths, series, colors, f"{run.label}: {label}\nstep {t}, mean of {_n_seeds(run)} seeds")
                if not ax.lines:       # e.g. hidden layers under a zero readout after one step
                    ax.text(0.5, 0.5, "0 at every width", transform=ax.transAxes, ha="center", fontsize=8)
                else:
                    min_log_span(ax, 10.0)         # a 10% wiggle must not fill the panel
            row[0].set_ylabel("RMS over probe examples and units", fontsize=7)
            for ax in row[len(steps):]:
                ax.axis("off")
        axes[len(TP5_ROWS) * i][len(steps) - 1].legend(fontsize=5, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, path)


def coord_flatness(run: Run) -> dict | None:
    """At the last measured step: per layer, max / min over widths (stats/coord.py spread) of the
    seed-mean update RMS |h_T - h_0| and of its own-update and input-change parts; None without
    coord rows. Near 1 under µP; a ratio growing with the width range means the layer's update
    scales with N."""
    means = coord_means(run)
    if not means:
        return None
    step = max(means)
    by_w = means[step]
    names = list(dict.fromkeys(n for layers in by_w.values() for n in layers))
    out = {}
    for n in names:
        out[n] = {}
        for q in ("delta_rms", "own_rms", "input_rms"):
            vals = [by_w[w].get(n, {}).get(q) for w in by_w]
            vals = [v for v in vals if v is not None and v > 0]
            out[n][q] = spread(vals) if len(vals) == len(by_w) >= 2 else None
    return {"step": step, "widths": sorted(by_w), "n_seeds": _n_seeds(run), "spread": out}


FIGURES = {"coord_tp5.png": coord_tp5}


def summary_lines(runs: list[Run]) -> list[str]:
    lines = []
    for run in runs:
        got = coord_flatness(run)
        if got is None:
            continue
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        per = "; ".join(f"{n}: {fmt(q['delta_rms'])} (own {fmt(q['own_rms'])}, input {fmt(q['input_rms'])})"
                        for n, q in got["spread"].items())
        lines.append(f"- {run.label}, step {got['step']}, widths {got['widths'][0]}-{got['widths'][-1]}, "
                     f"{got['n_seeds']} seeds: {per}.")
    if not lines:
        return []
    return ["## Coordinate check from the run (coord_tp5.png, coord_in_loop.png)", "",
            "Flatness: max / min over widths of the seed-mean update RMS |h_T - h_0| per layer at the last "
            "measured step (1 = flat), and of its own-update and input-change parts (– where a part is 0 at "
            "some width).", "", *lines, ""]


def summary_json(runs: list[Run]) -> dict:
    return {run.label: got for run in runs if (got := coord_flatness(run))}
