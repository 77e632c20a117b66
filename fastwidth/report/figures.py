"""The report's figures. Each function takes runs and an output path, draws one PNG and returns
its path, or None when the runs hold nothing it could draw (a figure is never an empty frame).

Colors encode width (viridis, narrow = dark) in every per-width panel; runs side by side are
panels with shared y axes so µP and SP read on one scale.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# the drawing helpers every figure module shares (Agg backend, widths' colors, saving)
from fastwidth.report._plotbase import (DPI, _loglog_axes, _panels, _save, _tokens_axis, _width_ticks,  # noqa: F401
                                        matplotlib,
                                        plt, width_colors)
from fastwidth.report.intervals import late_rmse_with_ci, width_intervals
from fastwidth.report.reader import Run
from fastwidth.stats.metrics import fit_power_law
from fastwidth.stats.preact_range import Bins


def seed_band(ax, run: Run, kind: str, key: str, color, **match) -> None:
    """Shade the min-max over seeds of row[key] per width/tokens (t > 0: the axis is logarithmic)."""
    by_t: dict[int, list[float]] = {}
    for r in run.rows(kind, **match):
        v = r.get(key)
        if v is not None and math.isfinite(v) and r["tokens"] > 0:
            by_t.setdefault(r["tokens"], []).append(v)
    pts = sorted((t, min(v), max(v)) for t, v in by_t.items() if len(v) > 1)
    if pts:
        t, lo, hi = zip(*pts)
        ax.fill_between(t, lo, hi, color=color, alpha=0.18, lw=0)


def _ema(values, alpha=0.2):
    out, m = [], None
    for v in values:
        m = v if m is None else (1 - alpha) * m + alpha * v
        out.append(m)
    return out


def loss_curves(runs: list[Run], path: Path) -> Path | None:
    if not any(run.rows("eval") or run.rows("train") for run in runs):
        return None
    fig, axes = _panels(runs)
    for ax, run in zip(axes, runs):
        colors = width_colors(run.widths)
        evals = run.series("eval", "probe_loss")
        for w, pts in evals.items():
            pts = [(t, v) for t, v in pts if t > 0]
            if pts:
                t, v = zip(*pts)
                ax.plot(t, v, "-o", ms=2.5, color=colors.get(w), label=f"N={w}")
                seed_band(ax, run, "eval", "probe_loss", colors.get(w), width=w)
        for w, pts in run.series("train", "loss").items():
            t, v = zip(*pts)
            ax.plot(t, _ema(v), "-", lw=0.8, alpha=0.35, color=colors.get(w), label=None if evals else f"N={w}")
        ax.set_title(f"{run.label}\nprobe loss (lines+dots, seed band), train loss EMA (faint)", fontsize=9)
        ax.set_yscale("log")
        _tokens_axis(ax, run)
    axes[0].set_ylabel("cross-entropy (nats)")
    axes[-1].legend(fontsize=7, title="width", title_fontsize=7)
    return _save(fig, path)


def rmse_curves(runs: list[Run], path: Path) -> Path | None:
    if not any(run.rows("consistency", ref="live") for run in runs):
        return None
    fig, axes = _panels(runs)
    for ax, run in zip(axes, runs):
        colors = width_colors(run.widths)
        for w, pts in run.series("consistency", "true_logit_rmse", ref="live").items():
            pts = [(t, v) for t, v in pts if v > 0]  # µP's zero readout makes every logit 0 at step 0
            if pts:
                t, v = zip(*pts)
                ax.plot(t, v, "-o", ms=2.5, color=colors.get(w), label=f"N={w}")
                seed_band(ax, run, "consistency", "true_logit_rmse", colors.get(w), ref="live", width=w)
        ax.set_yscale("log")
        ax.set_title(f"{run.label}\ntrue-logit RMSE from the N={run.ref_width} model (mean, min-max over seeds)",
                     fontsize=9)
        _tokens_axis(ax, run)
    axes[0].set_ylabel("true-logit RMSE")
    axes[-1].legend(fontsize=7, title="width", title_fontsize=7)
    return _save(fig, path)


def _loglog_fit(ax, x, y, color, label, marker="o"):
    slope, icpt = fit_power_law(x, y)
    ax.plot(x, y, marker=marker, ls="none", color=color, ms=6)
    if math.isfinite(slope):
        xs = np.array([min(x), max(x)], dtype=float)
        ax.plot(xs, np.exp(icpt) * xs ** slope, "-", color=color, lw=1.2, label=f"{label}: slope {slope:+.2f}")
    else:
        ax.plot([], [], color=color, label=f"{label}: no fit")
    return slope


def _error_bars(ax, values: dict[int, float], cis: dict[int, list | None], color) -> None:
    """95% bootstrap intervals over seeds (report/intervals.py) as vertical bars at each width."""
    pts = [(w, v, cis.get(w)) for w, v in sorted(values.items()) if cis.get(w) and v and v > 0]
    if pts:
        w, v, ci = zip(*pts)
        lo = [max(x - c[0], 0.0) if c[0] > 0 else x * (1 - 1e-3) for x, c in zip(v, ci)]  # log axis: no bar to <= 0
        ax.errorbar(w, v, yerr=[lo, [c[1] - x for x, c in zip(v, ci)]], fmt="none", ecolor=color, capsize=3, lw=1)


def _guide(ax, x, y, slope, text):
    """A dashed reference power law through the geometric middle of the data."""
    x = np.asarray(x, float)
    y = np.asarray([v for v in y if v and v > 0], float)
    if len(x) < 2 or len(y) == 0:
        return
    xm, ym = math.exp(np.log(x).mean()), math.exp(np.log(y).mean())
    xs = np.array([x.min(), x.max()])
    ax.plot(xs, ym * (xs / xm) ** slope, "--", color="gray", lw=1, label=text)




def rmse_vs_width(runs: list[Run], path: Path) -> Path | None:
    data = [(run, late_rmse_with_ci(run)) for run in runs]
    if not any(d for _, d in data):
        return None
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    colors = plt.get_cmap("tab10")
    for i, (run, d) in enumerate(data):
        if d:
            _loglog_fit(ax, list(d), [v for v, _ in d.values()], colors(i), run.label)
            _error_bars(ax, {w: v for w, (v, _) in d.items()}, {w: ci for w, (_, ci) in d.items()}, colors(i))
    data = [(run, {w: v for w, (v, _) in d.items()}) for run, d in data]
    first = next(d for _, d in data if d)
    _guide(ax, list(first), list(first.values()), -0.5, "N^-0.5 (paper)")
    _loglog_axes(ax, [w for _, d in data for w in d])
    ax.set_ylabel("late-time true-logit RMSE")
    ax.set_title("true-logit RMSE vs width (last 25% of tokens; bars: 95% CI over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _last(run: Run, kind: str, **match) -> list[dict]:
    step = max((r["step"] for r in run.rows(kind, **match)), default=None)
    return [] if step is None else run.rows(kind, step=step, **match)


def cka_vs_width(runs: list[Run], path: Path) -> Path | None:
    """CKA with the same-seed reference model per layer vs N; dashed: the reference width's own
    seed pairs (report/same_width.py), the most a single model could agree with another seed."""
    from fastwidth.report.same_width import LABEL, baseline_at, cka_by_layer, cka_same_width_run

    per_run = [(run, *cka_by_layer(run), cka_same_width_run(run)) for run in runs]
    if not any(t for _, _, t, _ in per_run):
        return None
    fig, axes = _panels(runs)
    for ax, (run, step, table, base) in zip(axes, per_run):
        cmap = plt.get_cmap("plasma")
        pairs = baseline_at(base, step)["pairs"] if base and "by_step" in base else {}
        for i, (layer, d) in enumerate(table.items()):
            color = cmap(0.85 * i / max(len(table) - 1, 1))
            ax.plot(list(d), list(d.values()), "-o", color=color, label=layer)
            if pairs.get(layer) is not None:
                ax.axhline(pairs[layer], color=color, ls="--", lw=1,
                           label=f"{LABEL} (N={run.ref_width}, {base['n_pairs']} pairs)" if i == 0 else None)
        ax.set_xscale("log", base=2)
        _width_ticks(ax, [w for d in table.values() for w in d])
        ax.set_xlabel("width N")
        ax.grid(True, alpha=0.3)
        note = f"\n{LABEL}: none (fewer than 2 seeds)" if base and "note" in base else ""
        ax.set_title(f"{run.label}\nCKA with the N={run.ref_width} model, final eval{note}", fontsize=9)
        ax.legend(fontsize=7, title="layer", title_fontsize=7)
    axes[0].set_ylabel("CKA (centered kernel alignment)")
    return _save(fig, path)


def final_signatures(run: Run, prefix: str) -> tuple[int | None, dict[int, tuple[dict, dict]]]:
    """(final eval step, {width: (signature, meta)}) of the first seed, for widths whose signature
    holds a key starting with `prefix`."""
    step = run.last_step("eval")
    seeds = sorted({r["seed"] for r in run.rows("eval")})
    per_w = {}
    for w in run.widths:
        got = run.signature(run.member_name(w, seeds[0]), step) if seeds and step is not None else None
        if got and any(k.startswith(prefix) for k in got[0]):
            per_w[w] = got
    return step, per_w


def preact_histograms(runs: list[Run], path: Path) -> Path | None:
    """Final-eval training-batch preactivation histograms, one panel per (run, layer), widths overlaid."""
    found = []
    for run in runs:
        step, per_w = final_signatures(run, "preact_hist/")
        if per_w:
            found.append((run, step, per_w))
    if not found:
        return None
    n_layers = max(len([k for k in next(iter(pw.values()))[0] if k.startswith("preact_hist/")]) for _, _, pw in found)
    fig, axes = plt.subplots(len(found), n_layers, figsize=(max(3.6 * n_layers, 5.0) + 0.6, 3.0 * len(found)),
                             squeeze=False)
    for row, (run, step, per_w) in enumerate(found):
        colors = width_colors(run.widths)
        for w, (sig, meta) in per_w.items():
            layers = sorted(k.split("/", 1)[1] for k in sig if k.startswith("preact_hist/"))
            for j, layer in enumerate(layers):
                h = sig[f"preact_hist/{layer}"].numpy()
                ax = axes[row][j]
                if (meta.get("hist_ranges") or {}).get(layer):   # per-layer bins + two overflow bins
                    bins = Bins.of(meta["hist_ranges"][layer])
                    edges = bins.edges(len(h))
                    if bins.units == "asinh":  # the axis the bins are uniform on
                        ax.set_xscale("asinh", linear_width=bins.scale)
                else:
                    edges = np.linspace(meta.get("hist_lo", -1.0), meta.get("hist_hi", 1.0), len(h) + 1)
                dens = h / max(h.sum(), 1) / np.diff(edges)
                ax.stairs(dens, edges, color=colors.get(w), lw=1.1, label=f"N={w}")
                ax.set_title(f"{run.label}: {layer} (step {step})", fontsize=8)
                ax.set_yscale("log")
                ax.grid(True, alpha=0.3)
        axes[row][0].set_ylabel("density")
        axes[row][-1].legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("preactivation (asinh bins on an asinh axis; edge bins: out of range)")
    return _save(fig, path)


def sharpness(runs: list[Run], path: Path) -> Path | None:
    if not any(run.rows("sharpness") for run in runs):
        return None
    fig, axes = _panels(runs)
    for ax, run in zip(axes, runs):
        colors = width_colors(run.widths)
        rows = run.rows("sharpness")
        for w, pts in run.series("sharpness", "lr_sharpness").items():
            t, v = zip(*pts)
            ax.plot(t, v, "-o", color=colors.get(w), label=f"N={w}")
        ax.axhline(2.0, color="red", ls="--", lw=1, label="edge of stability (2)")
        pk = sorted({r.get("precond") for r in rows})
        ax.set_title(f"{run.label}\npreconditioned sharpness x 2/threshold ({'/'.join(map(str, pk))})", fontsize=9)
        ax.set_yscale("log")
        _tokens_axis(ax, run)
    axes[0].set_ylabel("lr-sharpness (stable below 2)")
    axes[-1].legend(fontsize=7)
    return _save(fig, path)


def ensemble_variance(runs: list[Run], path: Path) -> Path | None:
    """Left: V_N with its interval and a log-log fit. Right: the debiased bias² per width with its
    interval (negatives kept: symlog axis) and the bias model β²(1/N - 1/N_ref)² of the final fit row."""
    data, cis = [], []
    for run in runs:
        rows = _last(run, "ensemble")
        d = {r["width"]: r["seed_variance"] for r in rows if r.get("seed_variance")}
        b = {r["width"]: (r["bias_sq_debiased"], r.get("bias_sq_debiased_ci")) for r in rows
             if r.get("bias_sq_debiased") is not None and r["width"] != run.ref_width}
        fit = (_last(run, "fit") or [{}])[0]
        data.append((run, d, b, fit))
        cis.append({w: iv.get("seed_variance_ci") for w, iv in width_intervals(run).items()} if d else {})
    if not any(d for _, d, _, _ in data):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab10")
    for i, (run, d, b, fit) in enumerate(data):
        if d:
            _loglog_fit(axes[0], list(d), list(d.values()), colors(i), run.label)
            _error_bars(axes[0], d, cis[i], colors(i))
        if b:
            _bias_panel(axes[1], run, b, fit, colors(i))
    first = next(d for _, d, _, _ in data if d)
    _guide(axes[0], list(first), list(first.values()), -1.0, "1/N")
    _loglog_axes(axes[0], [w for _, d, _, _ in data for w in d])
    axes[0].set_title("seed variance of the true logit V_N (final eval; bars: 95% CI)", fontsize=9)
    axes[0].set_ylabel("V_N")
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("symlog", linthresh=max([abs(v) for _, _, b, _ in data for v, _ in b.values()] + [1e-6]) / 50)
    axes[1].axhline(0, color="black", lw=0.6)
    axes[1].set_title("debiased bias² b̂² - V_N/S_N - V_ref/S_ref (final eval; bars: 95% CI)\n"
                      "line: bias model β²(1/N - 1/N_ref)²", fontsize=9)
    axes[1].set_xlabel("width N")
    axes[1].set_ylabel("b² (logit²)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, path)


def _bias_panel(ax, run: Run, b: dict[int, tuple], fit: dict, color) -> None:
    ws = sorted(b)
    vals = [b[w][0] for w in ws]
    lo = [b[w][0] - b[w][1][0] if b[w][1] else 0.0 for w in ws]
    hi = [b[w][1][1] - b[w][0] if b[w][1] else 0.0 for w in ws]
    ax.errorbar(ws, vals, yerr=[lo, hi], fmt="D", ms=4, color=color, capsize=3, label=f"{run.label} b̂²")
    beta_sq = fit.get("bias_beta_sq")
    if isinstance(beta_sq, (int, float)) and math.isfinite(beta_sq):
        grid = np.geomspace(min(ws), run.ref_width, 100)
        x2 = (1 / grid - 1 / run.ref_width) ** 2
        ci = fit.get("bias_beta_sq_ci")
        text = f"β² {beta_sq:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")
        ax.plot(grid, beta_sq * x2, "-", color=color, lw=1, label=f"{run.label} bias model, {text}")
        if ci:
            ax.fill_between(grid, ci[0] * x2, ci[1] * x2, color=color, alpha=0.15, lw=0)


def ntk_spectra(runs: list[Run], path: Path) -> Path | None:
    found = [(run, _last(run, "ntk")) for run in runs]
    found = [(r, rows) for r, rows in found if rows]
    if not found:
        return None
    fig, axes = plt.subplots(len(found), 2, figsize=(10.5, 3.6 * len(found)), squeeze=False)
    for (run, rows), (ax_e, ax_c) in zip(found, axes):
        colors = width_colors(run.widths)
        seed0 = min(r["seed"] for r in rows)
        for r in sorted(rows, key=lambda r: r["width"]):
            if r["seed"] != seed0:
                continue
            ev = np.clip(np.asarray(r["eigenvalues"], float), 1e-12, None)
            k = np.arange(1, len(ev) + 1)
            ax_e.plot(k, ev / ev.sum(), "-o", ms=2.5, color=colors.get(r["width"]), label=f"N={r['width']}")
            ax_c.plot(k, r["task_power"], "-o", ms=2.5, color=colors.get(r["width"]), label=f"N={r['width']}")
        ax_e.set_yscale("log")
        ax_e.set_title(f"{run.label}: eNTK eigenvalues / trace (step {rows[0]['step']})", fontsize=9)
        ax_c.set_title(f"{run.label}: task power C(k)", fontsize=9)
        for ax in (ax_e, ax_c):
            ax.set_xscale("log")
            ax.set_xlabel("k")
            ax.grid(True, which="both", alpha=0.3)
        ax_c.set_ylim(0, 1.02)
        ax_c.legend(fontsize=7)
    return _save(fig, path)


FIGURES = {
    "loss.png": loss_curves,
    "rmse_vs_tokens.png": rmse_curves,
    "rmse_vs_width.png": rmse_vs_width,
    "cka.png": cka_vs_width,
    "preact_hist.png": preact_histograms,
    "sharpness.png": sharpness,
    "ensemble_variance.png": ensemble_variance,
    "ntk.png": ntk_spectra,
}
from fastwidth.report.preact import preact_vs_width  # noqa: E402
# figures of whole sweeps and of training dynamics live in their own modules
from fastwidth.report.coord import coord_in_loop  # noqa: E402
from fastwidth.report.dynamics import edge_of_stability  # noqa: E402
from fastwidth.report.ntk import ntk_alignment  # noqa: E402
from fastwidth.report.slopes import slopes_over_training  # noqa: E402
from fastwidth.report.transfer import drift_over_training, loss_vs_lr  # noqa: E402

FIGURES.update({"loss_vs_lr.png": loss_vs_lr, "transfer_drift.png": drift_over_training,
                "slopes_vs_tokens.png": slopes_over_training, "edge_of_stability.png": edge_of_stability,
                "coord_in_loop.png": coord_in_loop, "ntk_alignment.png": ntk_alignment,
                "preact_vs_width.png": preact_vs_width})
