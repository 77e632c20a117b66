"""µTransfer: loss against learning rate per width, each width's optimum, and the optimum's drift.

    fit = drift(run, tokens)        # optima, slope of log η* on log N with its interval, sub-ranges, local slopes
    reads = late_drifts(run)        # the same at every evaluation of the run's second half
    loss_vs_lr([run_mup, run_sp], "loss_vs_lr.png"); drift_over_training(runs, "transfer_drift.png")

The loss of a member at a budget. Held out, where the run evaluated (stats on, eval rows with
base_lr): the probe loss at the evaluation nearest the budget, from the per-example losses in the
signatures, so the interval can resample the evaluation examples (stats/transfer.py: a bootstrap
over seeds × probe examples). Otherwise (a run with stats off) the mean online training loss over
the rows with tokens in (T - W, T], W = 10% of the run's tokens; each batch is new data, so it is a
held-out estimate too, but only the seeds are resampled and the window's batch noise is not in
the interval.

Optimum and drift: stats/transfer.py (a parabola in log η through the grid minimum and its
neighbours; the least-squares slope of log η* on log N; a member that diverged counts as loss
+inf at its learning rate; `below_grid_resolution` when the drift is smaller than half a grid step
of η* across the widths would make). A run with sweep.lr_refine is read twice: on the coarse grid
(the rows without `pass: "refine"`, grid="coarse") and on the union of the coarse grid and each
width's refined learning rates (grid="union", the default, which the figures draw); the table
and summary.json's `transfer` give both side by side. The drift is read over every width, without the base width
(param.base_width, where µP's multipliers are 1: the narrowest widths move most), and as local
slopes between neighbouring widths.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from fastwidth.report.reader import Run, progress_word, stopped_note
from fastwidth.stats.transfer import fmt_ci, optimum, range_label, transfer_fit
from fastwidth.run import MemberSpec
from fastwidth.run.metrics import REFINE

__all__ = ["budgets", "drift", "late_drifts", "loss_vs_lr", "lr_curves", "optimum", "refined", "transfer_lines",
           "transfer_summary"]

WINDOW = 0.1       # fraction of the run's tokens averaged at each budget (training-loss source)
BUDGETS = (0.25, 0.5, 1.0)
LATE = 0.5         # late reads: every evaluation in the last half of the run
N_BOOT = 400


def sweep_label(run: Run) -> str:
    """The run's label without the learning rate the per-width figures picked."""
    return run.label.rsplit(" lr=", 1)[0]


def max_tokens(run: Run) -> int:
    return max((r["tokens"] for r in run.sweep_rows if r.get("kind") in ("train", "eval")), default=0)


def refined(run: Run) -> bool:
    """Whether the run has a refinement pass (sweep.lr_refine) with rows."""
    return any(r.get("pass") == REFINE for r in run.sweep_rows)


def _rows(run: Run, grid: str = "union", at: dict | None = None) -> list[dict]:
    """The sweep's rows read on `grid` ("union" every row, "coarse" those of the first pass) that
    match `at` ({key: value}; a row without the key matches); default: in a depth sweep the
    reference depth, so the drift across width reads one depth."""
    at = at if at is not None else ({"depth": run.ref_depth} if run.ref_depth is not None else {})
    rows = run.sweep_rows if grid == "union" else [r for r in run.sweep_rows if r.get("pass") != REFINE]
    return [r for r in rows if all(r.get(k, v) == v for k, v in at.items())]


def _evals(run: Run) -> dict[int, int]:
    """{tokens: step} of the evaluations of a learning-rate sweep (after step 0)."""
    return {r["tokens"]: r["step"] for r in run.sweep_rows
            if r.get("kind") == "eval" and r.get("base_lr") is not None and r["step"] > 0}


def lr_curves(run: Run, tokens: int, grid: str = "union", axis: str = "width",
              at: dict | None = None) -> dict[int, dict[float, dict[int, float]]]:
    """{width: {lr: {seed: training-window loss at `tokens`}}}; a member stopped by then has inf.
    axis="depth" (with at={"width": w}): keyed by depth, the members of width w."""
    window = WINDOW * max_tokens(run)
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in _rows(run, grid, at):
        if r.get("kind") == "train" and r.get("base_lr") is not None and isinstance(r.get("loss"), (int, float)):
            if tokens - window < r["tokens"] <= tokens:
                acc[r[axis]][r["base_lr"]][r["seed"]].append(r["loss"])
    out = {w: {lr: {s: sum(v) / len(v) for s, v in seeds.items()} for lr, seeds in by_lr.items()}
           for w, by_lr in acc.items()}
    _mark_diverged(run, out, tokens, grid, axis, at)
    return {w: dict(sorted(d.items())) for w, d in sorted(out.items())}


def _mark_diverged(run: Run, out: dict, tokens: int, grid: str, axis: str = "width", at: dict | None = None) -> None:
    for r in _rows(run, grid, at):
        if r.get("kind") == "diverged" and r["tokens"] <= tokens:  # stopped by then: no loss at this budget or later
            out.setdefault(r[axis], {}).setdefault(r["base_lr"], {})[r["seed"]] = math.inf


def heldout_curves(run: Run, tokens: int, grid: str = "union", axis: str = "width",
                   at: dict | None = None) -> dict[int, dict[float, dict[int, np.ndarray]]]:
    """{width: {lr: {seed: per-example probe losses (P,)}}} at the evaluation at `tokens`; inf arrays
    for members stopped by then. A member without a stored signature keeps its probe_loss (P = 1).
    axis="depth" (with at={"width": w}): keyed by depth, the members of width w."""
    step = _evals(run).get(tokens)
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in _rows(run, grid, at):
        if r.get("kind") == "eval" and r.get("step") == step and r.get("base_lr") is not None:
            sig = run.signature(MemberSpec(r["width"], r["base_lr"], r["seed"], r.get("depth")).name, step)
            loss = sig[0].get("loss") if sig else None
            v = np.asarray(loss, dtype=np.float64) if loss is not None else np.array([r.get("probe_loss", math.nan)], float)
            out[r[axis]][r["base_lr"]][r["seed"]] = v
    flat: dict = {w: {lr: dict(s) for lr, s in d.items()} for w, d in out.items()}
    _mark_diverged(run, flat, tokens, grid, axis, at)
    return {w: dict(sorted(d.items())) for w, d in sorted(flat.items())}


def _array(curves: dict) -> tuple[list[int], list[float], np.ndarray]:
    """(widths, lrs, losses (W, R, S, P)) from nested curves; P = 1 where members disagree on it."""
    widths = sorted(curves)
    lrs = sorted({lr for d in curves.values() for lr in d})
    seeds = sorted({s for d in curves.values() for by_s in d.values() for s in by_s})
    sizes = {np.size(v) for d in curves.values() for by_s in d.values() for v in by_s.values() if np.all(np.isfinite(v))}
    p = sizes.pop() if len(sizes) == 1 else 1
    out = np.full((len(widths), len(lrs), len(seeds), p), np.nan)
    for i, w in enumerate(widths):
        for j, lr in enumerate(lrs):
            for k, s in enumerate(seeds):
                v = curves[w].get(lr, {}).get(s)
                if v is not None:
                    v = np.atleast_1d(np.asarray(v, dtype=np.float64))
                    out[i, j, k] = v if v.size == p else np.mean(v)
    return widths, lrs, out


def _ranges(run: Run, widths: list[int]) -> dict[str, list[int]]:
    """Sub-ranges read besides all widths: without the base width (µP's multipliers are 1 there),
    and without the widest (the range a narrower sweep would have)."""
    base = run.config.get("param", {}).get("base_width")
    rest = [w for w in widths if w != base]
    out = {"excl. base": rest} if base in widths and len(rest) >= 2 else {}
    return {**out, "excl. widest": widths[:-1]} if len(widths) >= 4 else out


def heldout(run: Run) -> bool:
    return bool(_evals(run))


def drift(run: Run, tokens: int, n_boot: int = N_BOOT, seed: int = 0, grid: str = "union") -> dict:
    """stats.transfer.transfer_fit at the budget `tokens` on `grid` ("union": every learning rate
    trained; "coarse": sweep.lrs alone), with "tokens", "source", "step", "grid" and "lrs".
    Cached on the run: the figures and the summary read the same fits."""
    cache = run.__dict__.setdefault("_drift_cache", {})
    grid = grid if refined(run) else "union"  # one grid: the same fit
    key = (tokens, n_boot, seed, grid)
    if key not in cache:
        cache[key] = _drift(run, tokens, n_boot, seed, grid)
    return cache[key]


def _drift(run: Run, tokens: int, n_boot: int, seed: int, grid: str) -> dict:
    if heldout(run):
        t = min(_evals(run), key=lambda e: abs(e - tokens))
        curves, source, step = heldout_curves(run, t, grid), "held-out probe", _evals(run)[t]
    else:
        t, curves, source, step = tokens, lr_curves(run, tokens, grid), "training window", None
    widths, lrs, losses = _array(curves)
    fit = transfer_fit(lrs, widths, losses, _ranges(run, widths), n_boot=n_boot, seed=seed)
    return {**fit, "tokens": t, "source": source, "step": step, "curves": curves, "grid": grid, "lrs": lrs}


def budgets(run: Run) -> list[int]:
    """Token budgets drawn: fractions BUDGETS of the run, snapped to evaluations (else train rows)."""
    logged = sorted(_evals(run)) or sorted({r["tokens"] for r in run.sweep_rows if r.get("kind") == "train"})
    if not logged:
        return []
    return sorted({min(logged, key=lambda t: abs(t - f * logged[-1])) for f in BUDGETS})


def late_drifts(run: Run, n_boot: int = N_BOOT) -> list[dict]:
    """The drift at every evaluation in the last LATE of the run (held-out runs only)."""
    evals = sorted(_evals(run))
    return [drift(run, t, n_boot) for t in evals if t >= (1 - LATE) * evals[-1]] if evals else []


def _seed_mean(v) -> float:
    vals = [float(np.mean(x)) for x in v.values()]
    return math.inf if any(x == math.inf for x in vals) else float(np.nanmean(vals))


def _draw_panel(ax, run: Run, tokens: int, colors) -> dict:
    fit = drift(run, tokens)
    curves = fit["curves"]
    means = {w: {lr: _seed_mean(d) for lr, d in by_lr.items()} for w, by_lr in curves.items()}
    finite = [m for d in means.values() for m in d.values() if math.isfinite(m)]
    top = max(finite) * 1.05 if finite else 1.0
    for w, d in means.items():
        ok = [(lr, m) for lr, m in d.items() if math.isfinite(m)]
        if ok:
            ax.plot(*zip(*ok), "-o", ms=3, color=colors.get(w), label=f"N={w}")
        bad = [lr for lr, m in d.items() if not math.isfinite(m)]
        if bad:
            ax.plot(bad, [top] * len(bad), "x", ms=7, color=colors.get(w))
        lr_star = fit["optima"].get(w)
        if lr_star is not None and math.isfinite(lr_star) and ok:
            y_star = np.interp(math.log(lr_star), np.log([p[0] for p in ok]), [p[1] for p in ok])
            ax.plot([lr_star], [y_star], "*", ms=13, mec="black", mew=0.6, color=colors.get(w))
    ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("base learning rate η")
    coarse = drift(run, tokens, grid="coarse")
    slope = f"{drift_text(coarse)} coarse,\n{drift_text(fit)} refined" if refined(run) else drift_text(fit)
    ax.set_title(f"{sweep_label(run)}: {progress_word(run)} {fit['tokens']}\nlog η* vs log N slope "
                 f"{slope} (x: diverged, *: optimum)", fontsize=8)
    return fit


def plot_optima(ax, fit: dict, color, label: str) -> None:
    """One fit's η* against its axis (width or depth): the optima, a red ring on those at the grid's
    edge, and the least-squares line of log η* carrying `label` (no line when the drift is not
    identified, only the label)."""
    pts = sorted((x, lr) for x, lr in fit["optima"].items() if math.isfinite(lr))
    if not pts:
        return
    xs, lrs = zip(*pts)
    ax.plot(xs, lrs, "o", color=color, ms=6)
    edge = [(x, lr) for x, lr in pts if fit["edge"].get(x)]
    if edge:
        ax.plot(*zip(*edge), "o", mfc="none", mec="red", ms=10)
    if fit.get("not_identified"):
        ax.plot([], [], "o", color=color, label=label)
    elif len(pts) >= 2 and math.isfinite(fit["slope"]):
        b = np.polyfit(np.log(xs), np.log(lrs), 1)
        ends = np.array([min(xs), max(xs)], float)
        ax.plot(ends, np.exp(b[1]) * ends ** b[0], "-", color=color, label=label)


def _draw_drift(ax, runs: list[Run], fits: list[dict]) -> None:
    import matplotlib.pyplot as plt
    from fastwidth.report._plotbase import _width_ticks
    cmap = plt.get_cmap("tab10")
    for i, (run, fit) in enumerate(zip(runs, fits)):
        plot_optima(ax, fit, cmap(i), f"{sweep_label(run)}: {drift_text(fit)}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _width_ticks(ax, [w for f in fits for w in f["optima"]])
    ax.set_xlabel("width N")
    ax.set_ylabel("optimal η* (end of training)")
    ax.set_title("optimum drift: slope of log η* on log N\n(red ring: at the grid's edge)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)


def _draw_local(ax, runs: list[Run], fits: list[dict]) -> None:
    """Local slopes between neighbouring widths (95% CI), at the geometric middle of each pair."""
    import matplotlib.pyplot as plt
    from fastwidth.report._plotbase import _width_ticks
    cmap = plt.get_cmap("tab10")
    for i, (run, fit) in enumerate(zip(runs, fits)):
        pts = [(math.sqrt(a * b) * (1 + 0.04 * i), loc) for loc in fit["local"] for a, b in [loc["widths"]]
               if math.isfinite(loc["slope"]) and not loc.get("not_identified")]
        if not pts:
            continue
        x = [p[0] for p in pts]
        y = [p[1]["slope"] for p in pts]
        err = [[max(v - p[1]["ci"][0], 0) if p[1]["ci"] else 0 for v, p in zip(y, pts)],
               [max(p[1]["ci"][1] - v, 0) if p[1]["ci"] else 0 for v, p in zip(y, pts)]]
        ax.errorbar(x, y, yerr=err, fmt="-o", ms=4, capsize=3, color=cmap(i), label=sweep_label(run))
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    _width_ticks(ax, [w for f in fits for w in f["optima"]])
    ax.set_xlabel("width N (between the neighbours)")
    ax.set_ylabel("local slope of log η*")
    ax.set_title("where transfer holds: log(η*_b/η*_a)/log(b/a)\n(95% bootstrap over seeds × examples)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)


def loss_vs_lr(runs: list[Run], path: Path) -> Path | None:
    """Rows: runs with sweep.lrs; columns: token budgets, the optimum's drift and its local slopes."""
    import matplotlib.pyplot as plt
    from fastwidth.report._plotbase import _save, width_colors
    runs = [r for r in runs if r.lrs and budgets(r)]
    if not runs:
        return None
    n_cols = max(len(budgets(r)) for r in runs) + 2
    fig, axes = plt.subplots(len(runs), n_cols, figsize=(4.2 * n_cols, 3.6 * len(runs)), squeeze=False)
    end_fits = []
    for row, run in enumerate(runs):
        colors = width_colors(run.widths)
        fits = [_draw_panel(axes[row][j], run, t, colors) for j, t in enumerate(budgets(run))]
        end_fits.append(fits[-1])
        axes[row][0].set_ylabel("probe loss (held out)" if heldout(run) else "training loss (online, window mean)")
        axes[row][0].legend(fontsize=6, title="width", title_fontsize=6)
        for j in range(len(fits), n_cols - 2):
            axes[row][j].axis("off")
        if row:
            axes[row][-1].axis("off")
            axes[row][-2].axis("off")
    _draw_drift(axes[0][-2], runs, end_fits)
    _draw_local(axes[0][-1], runs, end_fits)
    return _save(fig, path)


def drift_over_training(runs: list[Run], path: Path) -> Path | None:
    """The drift (95% band) at every evaluation of the second half, over all widths and without the base."""
    import matplotlib.pyplot as plt
    from fastwidth.report._plotbase import _save
    found = [(run, late_drifts(run)) for run in runs if run.lrs]
    found = [(run, reads) for run, reads in found if len(reads) >= 2]
    if not found:
        return None
    fig, axes = plt.subplots(1, len(found), figsize=(5.2 * len(found) + 0.6, 3.8), squeeze=False, sharey=True)
    for ax, (run, reads) in zip(axes[0], found):
        t = [r["tokens"] for r in reads]
        for (name, color) in (("all", "tab:blue"), ("excl. base", "tab:orange")):
            got = [r["ranges"].get(name) for r in reads]
            if not all(got):
                continue
            ax.plot(t, [g["slope"] for g in got], "-o", ms=3, color=color,
                    label=f"{range_label(got[0]['widths'])}" + (" (without the base width)" if name != "all" else ""))
            if all(g["ci"] for g in got):
                ax.fill_between(t, [g["ci"][0] for g in got], [g["ci"][1] for g in got], color=color, alpha=0.18, lw=0)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel(f"{progress_word(run)} seen")
        ax.set_title(f"{sweep_label(run)}: drift of η* read at each evaluation\n(band: 95% bootstrap, "
                     f"{reads[-1]['resampled']})", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("slope of log η* on log N")
    return _save(fig, path)


def _fit_cells(fit: dict) -> str:
    sub = [f"{range_label(r['widths'])}: {drift_text(r)}" for k, r in fit["ranges"].items() if k != "all"]
    loc = ", ".join(f"{a}→{b}: {drift_text(loc)}" for loc in fit["local"] for a, b in [loc["widths"]])
    return f"{'; '.join(sub) or '–'} | {loc}"


def drift_text(fit: dict, digits: int = 2) -> str:
    """The drift with its interval, or why it is not identified (every optimum at the grid's edge)."""
    if fit.get("not_identified"):
        return f"not identified: {fit['not_identified']}"
    if digits == 2:
        return fmt_ci(fit["slope"], fit["ci"])
    ci = fit["ci"] or [math.nan, math.nan]
    return f"{fit['slope']:+.{digits}f} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def _optima_cell(fit: dict) -> str:
    return ", ".join(f"{w}: {lr:.3g}{'*' if fit['edge'][w] else ''}" for w, lr in fit["optima"].items())


def _resolution_note(fit: dict) -> str:
    """"resolves 0.28: below it" — the grid's resolution of the drift (stats/transfer.py) and the verdict."""
    res = fit.get("resolution")
    if res is None or not math.isfinite(res):
        return "resolution –"
    return f"resolves ±{res:.3f}" + (": below it" if fit.get("below_grid_resolution") else "")


def _refined_cell(run: Run, t: int) -> str:
    """The union grid's optima and drift beside the coarse grid's (– without sweep.lr_refine)."""
    if not refined(run):
        return "–"
    fit = drift(run, t, grid="union")
    return f"{_optima_cell(fit)}; {drift_text(fit, 3)} ({_resolution_note(fit)})"


def transfer_summary(run: Run) -> dict | None:
    """summary.json `transfer`: the drift at the end of the run on the coarse grid and (sweep.lr_refine)
    on the union grid, each {tokens, source, lrs, optima, edge, slope, ci, resolution,
    below_grid_resolution, ranges, local, seeds, examples}; None without a learning-rate sweep."""
    if not (run.lrs and budgets(run)):
        return None
    keys = ("tokens", "source", "lrs", "optima", "edge", "slope", "ci", "not_identified", "resolution", "below_grid_resolution",
            "ranges", "local", "seeds", "examples", "resampled")
    t = budgets(run)[-1]
    row = lambda fit: {k: fit[k] for k in keys}  # noqa: E731
    return {"coarse": row(drift(run, t, grid="coarse")), "refined": row(drift(run, t, grid="union")) if refined(run) else None}


def transfer_lines(runs: list[Run]) -> list[str]:
    """summary.md lines: members left out for divergence, each sweep's optimum and drift (on the coarse
    grid, and beside it on the refined union grid), late reads."""
    lines = [line for run in runs for line in stopped_note(run)]
    sweeps = [r for r in runs if r.lrs and budgets(r)]
    if not sweeps:
        return lines
    lines += ["## Learning-rate transfer", "",
              "| run | seen | η* per width (sub-grid; * = at the grid's edge) | slope of log η* on log N [95% bootstrap] "
              "| sub-ranges (without the base width; without the widest) | local slopes "
              "| refined grid (sweep.lr_refine): η* per width; slope [95% bootstrap] |", "|---|---:|---|---|---|---|---|"]
    for run in sweeps:
        for t in budgets(run):
            fit = drift(run, t, grid="coarse")
            lines.append(f"| {sweep_label(run)} | {fit['tokens']} {progress_word(run)} | {_optima_cell(fit)} | "
                         f"{drift_text(fit, 3)} ({fit['seeds']} seeds, {fit['source']}, "
                         f"resampling {fit['resampled']}; {_resolution_note(fit)}) | {_fit_cells(fit)} | "
                         f"{_refined_cell(run, t)} |")
    lines += ["", "Resolution: the drift that half a grid step of η* across the widths makes, "
              "(½ · widest local step in log η) / log(N_max/N_min); a drift below it is within what the grid "
              "alone can move it (stats/transfer.py).", ""]
    for run in sweeps:
        reads = late_drifts(run)
        if len(reads) >= 2:
            lines += [f"{sweep_label(run)}: the drift read at every evaluation of the second half (held-out probe, "
                      f"{reads[-1]['examples']} examples):", "",
                      "| step | all widths | without the base width | without the widest |", "|---:|---|---|---|"]
            for r in reads:
                subs = [r["ranges"].get(k) for k in ("excl. base", "excl. widest")]
                lines.append(f"| {r['step']} | {drift_text(r)} | "
                             + " | ".join(f"{range_label(x['widths'])}: {drift_text(x)}" if x else "–"
                                          for x in subs) + " |")
            lines += [""]
    return lines


# ------------------------------------------------------------------------------ across depth

def drift_depth(run: Run, width: int, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """η* against depth at `width` at the end of a depth sweep with sweep.lrs: transfer_fit with
    axis="depth" on the held-out probe losses (else the training window), with "width", "tokens",
    "source" and "lrs". Cached on the run."""
    cache = run.__dict__.setdefault("_drift_depth_cache", {})
    key = (width, n_boot, seed)
    if key not in cache:
        at = {"width": width}
        if heldout(run):
            t = max(_evals(run))
            curves, source = heldout_curves(run, t, axis="depth", at=at), "held-out probe"
        else:
            t = budgets(run)[-1]
            curves, source = lr_curves(run, t, axis="depth", at=at), "training window"
        depths, lrs, losses = _array(curves)
        fit = transfer_fit(lrs, depths, losses, n_boot=n_boot, seed=seed, axis="depth")
        cache[key] = {**fit, "width": width, "tokens": t, "source": source, "lrs": lrs}
    return cache[key]


def depth_fits(run: Run) -> list[dict]:
    """drift_depth at every width of a depth sweep with sweep.lrs; [] otherwise."""
    if len(run.depths) < 2 or not (run.lrs and budgets(run)):
        return []
    return [drift_depth(run, w) for w in run.widths]


def draw_transfer_depth(fits: list[tuple[str, dict]], path: Path) -> Path | None:
    """η* against depth, one line per (label, fit of transfer_fit(axis="depth")): the optima (red
    ring: at the grid's edge), the least-squares line of log η* on log depth, its slope with the 95%
    interval and the grid's resolution in the legend."""
    import matplotlib.pyplot as plt
    from fastwidth.report._plotbase import _loglog_axes, _save, min_log_span
    fits = [(label, f) for label, f in fits if any(math.isfinite(v) for v in f["optima"].values())]
    if not fits:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    cmap = plt.get_cmap("tab10")
    for i, (label, fit) in enumerate(fits):
        note = "" if fit.get("not_identified") else f" ({_resolution_note(fit)})"
        plot_optima(ax, fit, cmap(i), f"{label}: {drift_text(fit)}{note}")
    _loglog_axes(ax, [d for _, f in fits for d in f["optima"]], xlabel="depth L")
    min_log_span(ax)
    ax.set_ylabel("optimal η*")
    ax.set_title("µTransfer across depth: slope of log η* on log L [95% bootstrap]\n(red ring: at the grid's edge)",
                 fontsize=8)
    ax.legend(fontsize=6)
    return _save(fig, path)


def transfer_depth(runs: list[Run], path: Path) -> Path | None:
    """The report's figure: draw_transfer_depth of every depth sweep with sweep.lrs, per width."""
    return draw_transfer_depth([(f"{sweep_label(run)} N={f['width']}", f) for run in runs for f in depth_fits(run)], path)


def depth_transfer_rows(fits: list[tuple[str, dict]]) -> list[str]:
    """Markdown table rows: label | η* per depth | slope [95%] | resolution, below it? | local slopes."""
    rows = []
    for label, fit in fits:
        optima = ", ".join(f"{d}: {lr:.3g}{'*' if fit['edge'][d] else ''}" for d, lr in fit["optima"].items())
        local = ", ".join(f"{a}→{b}: {drift_text(x)}" for x in fit["local"] for a, b in [x["depths"]])
        rows.append(f"| {label} | {optima} | {drift_text(fit)} | {_resolution_note(fit)} | {local} |")
    return rows


DEPTH_TABLE_HEAD = ["| run | η* per depth (* = at the grid's edge) | slope of log η* on log depth [95% bootstrap] "
                    "| grid resolution | local slopes |", "|---|---|---|---|---|"]


def transfer_depth_lines(runs: list[Run]) -> list[str]:
    """summary.md: η* against depth per width of each depth sweep with sweep.lrs."""
    fits = [(f"{sweep_label(run)} N={f['width']}", f) for run in runs for f in depth_fits(run)]
    if not fits:
        return []
    return ["## Learning-rate transfer across depth", "", *DEPTH_TABLE_HEAD, *depth_transfer_rows(fits), "",
            f"Held out where the runs evaluated ({fits[0][1]['source']}); intervals resample "
            f"{fits[0][1]['resampled']}; resolution as across width, with log(L_max/L_min).", ""]
