"""Figures of the cross-width metrics the loop computes: per-width agreement, the ensemble
decomposition, L(E) curves and feature-kernel heatmaps. Same conventions as figures.py: one PNG
per function, None when the runs hold nothing to draw; seed bands are the min-max over seeds.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fastwidth.report._plotbase import DPI, _loglog_axes, _panels, _save, _width_ticks, plt, width_colors
from fastwidth.report.figures import _last, final_signatures
from fastwidth.report.reader import Run, get, probe_labels, progress_word
from fastwidth.stats.signature import strided_index


def _per_seed_final(run: Run, key: str) -> dict[int, list[float]]:
    """{width: [value per seed]} of a consistency key (dotted; dicts are averaged) at the final eval."""
    out: dict[int, list[float]] = {}
    for r in _last(run, "consistency", ref="live"):
        v = get(r, key)
        if isinstance(v, dict):
            vals = [x for x in v.values() if x is not None and math.isfinite(x)]
            v = sum(vals) / len(vals) if vals else None
        if v is not None and math.isfinite(v):
            out.setdefault(r["width"], []).append(v)
    return out


def _band_plot(ax, data: dict[int, list[float]], color, label):
    ws = sorted(data)
    mean = [np.mean(data[w]) for w in ws]
    lo = [mean[i] - min(data[w]) for i, w in enumerate(ws)]
    hi = [max(data[w]) - mean[i] for i, w in enumerate(ws)]
    ax.errorbar(ws, mean, yerr=[lo, hi], fmt="-o", ms=4, capsize=3, color=color, label=label)


METRICS = (("loss_gap", "probe-loss gap to the reference (nats)"),
           ("top1_agreement", "top-1 agreement with the reference"),
           ("preact_w1", "preactivation W1 to the reference (mean over layers)"))


def width_agreement(runs: list[Run], path: Path) -> Path | None:
    """Loss gap, top-1 agreement and preactivation W1 against the reference width vs N."""
    data = {k: [(run, _per_seed_final(run, k)) for run in runs] for k, _ in METRICS}
    present = [(k, t) for k, t in METRICS if any(d for _, d in data[k])]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.6 * len(present) + 0.4, 3.8), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (key, title) in zip(axes[0], present):
        for i, (run, d) in enumerate(data[key]):
            if d:
                _band_plot(ax, d, colors(i), run.label)
        ax.set_xscale("log", base=2)
        _width_ticks(ax, [w for _, d in data[key] for w in d])
        ax.set_xlabel("width N")
        ax.set_title(f"{title}\nfinal eval, mean and min-max over seeds", fontsize=8)
        ax.grid(True, alpha=0.3)
        if key == "loss_gap":
            ax.axhline(0, color="gray", lw=0.8)
        ax.legend(fontsize=7)
    return _save(fig, path)


def decomposition(runs: list[Run], path: Path) -> Path | None:
    """Debiased bias² (95% interval), V_N and V_N/S, and the mean RMSE² vs N: RMSE² ≈ b² + V_N + V_ref."""
    found = [(run, {r["width"]: r for r in _last(run, "ensemble")}) for run in runs]
    found = [(run, e) for run, e in found if any(r.get("seed_variance") for r in e.values())]
    if not found:
        return None
    fig, axes = _panels([run for run, _ in found], height=4.0)
    for ax, (run, ens) in zip(axes, found):
        ws = sorted(w for w, r in ens.items() if r.get("seed_variance"))
        v = np.array([ens[w]["seed_variance"] for w in ws])
        s = np.array([ens[w].get("n_seeds", 1) for w in ws])
        ax.plot(ws, v, "-o", color="tab:blue", label="V_N (one model's seed variance)")
        ax.plot(ws, v / s, "--o", color="tab:blue", alpha=0.5, label="V_N / E, E = S (ensemble of all seeds)")
        rmse2 = _per_seed_final(run, "true_logit_rmse")
        if rmse2:
            rw = sorted(rmse2)
            ax.plot(rw, [np.mean(np.square(rmse2[w])) for w in rw], "-s", color="tab:red", label="RMSE² to the reference")
        _debiased(ax, ens)
        _loglog_axes(ax, ws)
        ax.set_title(f"{run.label}: decomposition at step {next(iter(ens.values()))['step']}", fontsize=9)
        ax.legend(fontsize=6.5)
    axes[0].set_ylabel("squared logit units")
    return _save(fig, path)


def _debiased(ax, ens: dict[int, dict]) -> None:
    """Debiased b² with its interval; values <= 0 (no detectable bias) drawn hollow at the interval top."""
    pts = [(w, r["bias_sq_debiased"], r.get("bias_sq_debiased_ci")) for w, r in sorted(ens.items())
           if r.get("bias_sq_debiased") is not None]
    if not pts:
        return
    for w, b2, ci in pts:
        top = ci[1] if ci else None
        if b2 > 0:
            lo = b2 - max(ci[0], b2 * 1e-3) if ci else 0
            ax.errorbar([w], [b2], yerr=[[lo], [(top - b2) if ci else 0]], fmt="D", color="tab:green", capsize=3)
        elif top and top > 0:
            ax.plot([w], [top], "v", mfc="none", color="tab:green")
    ax.plot([], [], "D", color="tab:green", label="debiased bias² b̂² - V_N/S_N - V_ref/S_ref (95% CI)")
    ax.plot([], [], "v", mfc="none", color="tab:green", label="b² <= 0: upper end of its CI")


def ensemble_curves(runs: list[Run], path: Path) -> Path | None:
    """L(E) of averaged-logit ensembles of E members per width, with the fit L∞ + c/E."""
    found = [(run, {r["width"]: r for r in _last(run, "ensemble") if r.get("ensemble_loss")}) for run in runs]
    found = [(run, e) for run, e in found if e]
    if not found:
        return None
    fig, axes = _panels([run for run, _ in found], sharey=False)
    for ax, (run, ens) in zip(axes, found):
        colors = width_colors(list(ens))
        for w, r in sorted(ens.items()):
            e = np.arange(1, len(r["ensemble_loss"]) + 1)
            ax.plot(e, r["ensemble_loss"], "o", color=colors[w], label=f"N={w}")
            if r.get("ensemble_loss_inf") is not None and r.get("ensemble_loss_c") is not None:
                xs = np.linspace(1, max(e), 50)
                ax.plot(xs, r["ensemble_loss_inf"] + r["ensemble_loss_c"] / xs, "-", lw=1, color=colors[w])
        ax.set_xlabel("ensemble members E (averaged logits)")
        ax.set_title(f"{run.label}: probe loss L(E), lines L∞ + c/E", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, title="width", title_fontsize=7)
    axes[0].set_ylabel("cross-entropy (nats)")
    return _save(fig, path)


MAX_DRAWN_CLASSES = 20     # class boundaries and labels drawn up to this many classes (an LM's tokens: sorted only)


def class_order(labels) -> tuple[np.ndarray, list[int]]:
    """(perm, boundaries): the stable permutation that sorts `labels` ascending, and the positions
    in the sorted order where a new label starts. k[np.ix_(perm, perm)] is the kernel sorted by
    class: the same entries, each point's row and column moved together."""
    lab = np.asarray(labels).reshape(-1)
    perm = np.argsort(lab, kind="stable")
    ordered = lab[perm]
    return perm, (np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist()


def kernel_point_labels(run: Run, meta: dict, n_points: int) -> np.ndarray | None:
    """The labels of a signature's kernel points (classifiers: classes; LMs: target tokens), the
    probe's targets at strided_index(probe_points, kernel_points); None without the run's probe
    file or when it does not match the signature's kernel."""
    y = probe_labels(run)
    if y is None or meta.get("probe_points", y.numel()) != y.numel():
        return None
    idx = strided_index(y.numel(), int(meta.get("kernel_points", n_points)))
    return y[idx].numpy() if len(idx) == n_points else None


def kernel_heatmaps(runs: list[Run], path: Path) -> Path | None:
    """The last feature layer's kernel Φ at the final eval (first seed), widths side by side, its
    points sorted by class (classifiers: the probe label; LMs: the target token) with the class
    boundaries drawn, so the block structure of learned features shows; probe order where the run
    keeps no probe file."""
    rows = []
    for run in runs:
        step, sigs = final_signatures(run, "kernel/")
        per_w, labels = {}, None
        for w, (sig, meta) in sigs.items():
            last = sorted(k for k in sig if k.startswith("kernel/"))[-1]
            per_w[w] = (last.split("/", 1)[1], sig[last].float().numpy())
            labels = kernel_point_labels(run, meta, per_w[w][1].shape[0]) if labels is None else labels
        if per_w:
            rows.append((run, step, per_w, labels))
    if not rows:
        return None
    cols = max(len(p) for _, _, p, _ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols + 0.6, 2.9 * len(rows)), squeeze=False)
    for i, (run, step, per_w, labels) in enumerate(rows):
        vmax = max(float(np.abs(k).max()) for _, k in per_w.values()) or 1.0
        word = "class" if progress_word(run) == "examples" else "target token"
        perm, bounds = class_order(labels) if labels is not None else (None, [])
        order = f"sorted by {word}" if perm is not None else "probe order (no probe file)"
        n_classes = len(bounds) + 1
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(per_w):
                ax.axis("off")
                continue
            w = sorted(per_w)[j]
            layer, k = per_w[w]
            if perm is not None:
                k = k[np.ix_(perm, perm)]
            im = ax.imshow(k, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            if perm is not None and n_classes <= MAX_DRAWN_CLASSES:
                for b in bounds:
                    ax.axhline(b - 0.5, color="black", lw=0.4)
                    ax.axvline(b - 0.5, color="black", lw=0.4)
                edges = [0, *bounds, len(perm)]
                ax.set_xticks([(a + b) / 2 - 0.5 for a, b in zip(edges, edges[1:])],
                              [str(labels[perm][a]) for a in edges[:-1]], fontsize=5)
            ax.set_title(f"{run.label}\nN={w} {layer}, step {step}", fontsize=7)
        axes[i][0].set_ylabel(f"{len(next(iter(per_w.values()))[1])} probe points, {order}", fontsize=6)
        fig.colorbar(im, ax=list(axes[i]), shrink=0.8, label="Φ = φφᵀ/N")
    fig.savefig(path, dpi=DPI)                    # no tight_layout: it cannot place a shared colorbar
    plt.close(fig)
    return path


FIGURES = {
    "width_agreement.png": width_agreement,
    "decomposition.png": decomposition,
    "ensemble_curves.png": ensemble_curves,
    "kernels.png": kernel_heatmaps,
}
