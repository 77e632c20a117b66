"""The spectral mechanism where a bias exists: seed-averaged eNTK eigenvalues and task power C(k) across widths, ΔC(k) against the debiased b², a same-width baseline and kernel regression with each width's ensemble after-kernel.

    d = spectral_run(run)            # None without stored eNTKs; else stats/ntk_across.spectral_mechanism's dict
    FIGURES["spectral.png"](runs, path)        # λ_k/tr and C(k) per width
    FIGURES["spectral_bias.png"](runs, path)   # ΔC(16) vs b², discrepancy vs its baseline, after-kernel error

The target is ±1 by label (stats/ntk_across.pm1_target) of the class whose centered logit the eNTK
differentiates (stats.ntk_output: class; with 2 classes z_c − mean z = ±(z0 − z1)/2). The debiased
b² per width is the ensemble row's at the eNTK's step (what report/summary.py reads). The section's
protocol (report/sections.py): FIGURES, summary_lines(runs), summary_json(runs).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fastwidth.report.ntk import ntk_members, ntk_steps  # noqa: E402
from fastwidth.report.intervals import with_interval  # noqa: E402
from fastwidth.report.reader import Run  # noqa: E402
from fastwidth.stats.ntk_across import pm1_target, spectral_mechanism  # noqa: E402

N_BOOT = 200
K_MAX, K_C = 32, 16
TRAIN_FRACTION = 0.75      # 192 of 256 points train the kernel regression, the last 64 test it
RIDGE = 1e-3               # × mean diagonal of the training kernel; chosen once, for every width and step
_CACHE: dict[tuple, dict | None] = {}


def spectral_run(run: Run, step: int | None = None, n_boot: int | None = None) -> dict | None:
    """spectral_mechanism at `step` (default: the last step every kept member stored an eNTK), with
    the step, the kernel kind, the class and each width's debiased b² (and interval) added."""
    files, common = ntk_steps(run)
    step = common[-1] if step is None and common else step
    if step is None or step not in common:
        return None
    n_boot = N_BOOT if n_boot is None else n_boot
    key = (str(run.path), step, n_boot, tuple(sorted(files)))
    if key in _CACHE:
        return _CACHE[key]
    _, members, metas = ntk_members(run, step)
    kernels: dict[int, list] = {}
    for m in sorted(members, key=lambda m: (m.width, m.seed)):
        kernels.setdefault(m.width, []).append(m.kernel)
    ref = run.ref_width if run.ref_width in kernels else max(kernels)
    n = members[0].labels.numel()
    k_max = min(K_MAX, n - 1)
    out = spectral_mechanism(kernels, pm1_target(members[0].labels, members[0].cls), ref, k_max=k_max,
                             k_c=min(K_C, k_max), n_train=max(1, min(n - 1, round(TRAIN_FRACTION * n))),
                             ridge=RIDGE, n_boot=n_boot)
    ens = {r["width"]: r for r in run.rows("ensemble", step=step)}
    for row in out["widths"]:
        e = ens.get(row["width"], {})
        row.update(bias_sq_debiased=e.get("bias_sq_debiased"), bias_sq_debiased_ci=e.get("bias_sq_debiased_ci"))
    out.update(step=step, steps=common, ntk_class=members[0].cls, kernel=metas[0].get("kernel"),
               output=metas[0].get("output"), label=run.label)
    _CACHE[key] = out
    return out


def _found(runs: list[Run]) -> list[tuple[Run, dict]]:
    return [(r, d) for r, d in ((r, spectral_run(r)) for r in runs) if d]


def _err(v: float | None, ci: list | None) -> list:
    """[[below], [above]] error bar lengths (0 without an interval)."""
    if v is None or ci is None:
        return [[0.0], [0.0]]
    return [[max(v - ci[0], 0.0)], [max(ci[1] - v, 0.0)]]


def draw_spectral(runs: list[Run], path: Path) -> Path | None:
    """Left: λ_k / tr of each width's seed-averaged eNTK (k <= 32, log y). Right: C(k) of the ±1
    target in its eigenvectors, with 95% bootstrap bands over seeds."""
    from fastwidth.report._plotbase import _save, width_colors
    found = _found(runs)
    if not found:
        return None
    fig, axes = plt.subplots(len(found), 2, figsize=(10.5, 3.8 * len(found)), squeeze=False)
    for (run, d), (ax_l, ax_c) in zip(found, axes):
        colors = width_colors([r["width"] for r in d["widths"]])
        for r in d["widths"]:
            k = np.arange(1, d["k_max"] + 1)
            lab = f"N={r['width']}{' (ref)' if r['reference'] else ''} ({r['n_seeds']} seeds)"
            ax_l.plot(k, r["eigenvalues_norm"], "-o", ms=2.5, color=colors[r["width"]], label=lab)
            ax_c.plot(k, r["task_power"], "-", color=colors[r["width"]], label=lab)
            ci = [c for c in r["task_power_ci"]]
            if all(c is not None for c in ci):
                ax_c.fill_between(k, [c[0] for c in ci], [c[1] for c in ci], color=colors[r["width"]], alpha=0.15)
        ax_l.set_yscale("log")
        ax_l.set_xlabel("eigenvalue index k")
        ax_l.set_ylabel("λ_k / tr K̄  (dimensionless)")
        ax_l.set_title(f"{run.label}: seed-averaged eNTK spectrum ({d['kernel']} kernel, step {d['step']})", fontsize=9)
        first = spectral_run(run, d["steps"][0]) if len(d["steps"]) > 1 else None
        for r in first["widths"] if first else []:
            ax_c.plot(np.arange(1, d["k_max"] + 1), r["task_power"], "--", lw=1, color=colors[r["width"]])
        if first:
            ax_c.plot([], [], "k--", lw=1, label=f"step {first['step']} (dashed)")
        ax_c.axvline(d["k_c"], color="gray", ls=":", lw=1)
        ax_c.set_ylim(0, 1.02)
        ax_c.set_xlabel("k (top-k eigenvectors)")
        ax_c.set_ylabel(f"C(k): share of the ±1 target's power (class {d['ntk_class']})")
        ax_c.set_title(f"{run.label}: task power at step {d['step']} (solid, 95% bootstrap over seeds)", fontsize=9)
        for ax in (ax_l, ax_c):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, path)


def draw_bias(runs: list[Run], path: Path) -> Path | None:
    """Left: ΔC(16) = C_ref(16) − C_N(16) against the debiased b² (both with 95% intervals). Middle:
    the eigenvalue discrepancy against N with the reference width's halves baseline. Right: the
    kernel-regression test MSE and sign error of each width's ensemble after-kernel."""
    from fastwidth.report._plotbase import _save, _width_ticks, width_colors
    found = _found(runs)
    if not found:
        return None
    fig, axes = plt.subplots(len(found), 3, figsize=(15, 3.9 * len(found)), squeeze=False)
    for (run, d), (ax_b, ax_d, ax_r) in zip(found, axes):
        colors = width_colors([r["width"] for r in d["widths"]])
        others = [r for r in d["widths"] if not r["reference"]]
        base, kc = d.get("baseline"), d["k_c"]
        for r in others:
            if r.get("bias_sq_debiased") is None:
                continue
            ax_b.errorbar([r["bias_sq_debiased"]], [r["delta_c"]], xerr=_err(r["bias_sq_debiased"], r["bias_sq_debiased_ci"]),
                          yerr=_err(r["delta_c"], r["delta_c_ci"]), fmt="o", capsize=3, color=colors[r["width"]],
                          label=f"N={r['width']} ({r['n_seeds']} seeds)")
        if base:
            ax_b.axhspan(-abs(base["delta_c"]), abs(base["delta_c"]), color="gray", alpha=0.2,
                         label=f"±|ΔC({kc})| between halves of N={base['width']}'s seeds")
        ax_b.axhline(0, color="k", lw=0.6)
        ax_b.axvline(0, color="k", lw=0.6)
        ax_b.set_xlabel("debiased bias² b² at this step (true-logit units²)")
        ax_b.set_ylabel(f"ΔC({kc}) = C_ref({kc}) − C_N({kc})")
        ax_b.set_title(f"{run.label}: task power lost against the bias (step {d['step']})", fontsize=9)
        ws = [r["width"] for r in others]
        ax_d.errorbar(ws, [r["discrepancy"] for r in others], yerr=np.hstack([_err(r["discrepancy"], r["discrepancy_ci"])
                                                                               for r in others]),
                      fmt="-o", capsize=3, label=f"N vs N={d['ref_width']}, all seeds (95% bootstrap)")
        half = [(r["width"], r.get("halves_discrepancy")) for r in others if r.get("halves_discrepancy") is not None]
        if half:
            ax_d.plot(*zip(*half), "--^", label="N's half vs ref's half of the seeds")
        if base:
            ax_d.axhline(base["discrepancy"], color="gray", ls="--",
                         label=f"baseline: N={base['width']} seeds {base['half_a']} vs {base['half_b']}")
        ax_d.set_xscale("log", base=2)
        _width_ticks(ax_d, ws)
        ax_d.set_ylim(bottom=0)
        ax_d.set_xlabel("width N")
        ax_d.set_ylabel(f"RMS_k≤{d['k_max']} of Δ log(λ_k / tr)")
        ax_d.set_title(f"{run.label}: eigenvalue discrepancy with the reference", fontsize=9)
        allw = [r["width"] for r in d["widths"]]
        for key, fmt, name in (("test_mse", "-o", "test MSE"), ("test_sign_error", "-s", "test sign error")):
            ax_r.errorbar(allw, [r[key] for r in d["widths"]],
                          yerr=np.hstack([_err(r[key], r[f"{key}_ci"]) for r in d["widths"]]),
                          fmt=fmt, capsize=3, label=name)
        ax_r.set_xscale("log", base=2)
        _width_ticks(ax_r, allw)
        ax_r.set_xlabel("width N")
        ax_r.set_ylabel("error of the ±1 target (MSE, or fraction)")
        ax_r.set_title(f"{run.label}: ridge regression, ensemble after-kernel "
                       f"({d['n_train']}/{d['points'] - d['n_train']} points)", fontsize=9)
        for ax in (ax_b, ax_d, ax_r):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, path)


FIGURES: dict = {"spectral.png": draw_spectral, "spectral_bias.png": draw_bias}


_NONE = object()   # the number has no interval by design (one split, one point)


def _fmt(v, ci=_NONE, digits: int = 4) -> str:
    """A number with its interval; "not identified" when absent or not finite; a missing interval
    (fewer than 3 seeds) said so."""
    no_ci = "" if ci is _NONE else " (no interval: < 3 seeds)"
    return with_interval(v, None if ci is _NONE else ci, f".{digits}g", missing="not identified", no_ci=no_ci)


HEADING = "The spectral mechanism (spectral.png, spectral_bias.png)"


def _steps(run: Run, d: dict) -> list[dict]:
    """The spectral numbers at the first stored step (when earlier than the last) and the last."""
    first = spectral_run(run, d["steps"][0]) if len(d["steps"]) > 1 else None
    return [e for e in (first, d) if e]


def _table(d: dict) -> list[str]:
    kc, base = d["k_c"], d.get("baseline")
    out = [f"Step {d['step']}:", "",
           f"| width | seeds | C({kc}) [95%] | ΔC({kc}) [95%] | ΔC({kc}) halves | discrepancy [95%] | "
           f"discrepancy halves | debiased b² [95%] | kernel regression test MSE [95%] | sign error [95%] |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in d["widths"]:
        ref = r["reference"]
        out.append(f"| {r['width']}{' (ref)' if ref else ''} | {r['n_seeds']} | {_fmt(r['c_k'], r['c_k_ci'])} | "
                   + ("– | – | – | – | – | " if ref else
                      f"{_fmt(r['delta_c'], r['delta_c_ci'])} | {_fmt(r.get('halves_delta_c'))} | "
                      f"{_fmt(r['discrepancy'], r['discrepancy_ci'])} | {_fmt(r.get('halves_discrepancy'))} | "
                      f"{_fmt(r['bias_sq_debiased'], r['bias_sq_debiased_ci'])} | ")
                   + f"{_fmt(r['test_mse'], r['test_mse_ci'])} | {_fmt(r['test_sign_error'], r['test_sign_error_ci'])} |")
    if base:
        out += ["", f"Baseline (sampling alone) at step {d['step']}: N={base['width']}'s seeds {base['half_a']} against "
                f"{base['half_b']}, each half's averaged kernel: ΔC({kc}) = {base['delta_c']:+.4f}, discrepancy "
                f"= {_fmt(base['discrepancy'])}."]
    else:
        out += ["", "Baseline: not identified (fewer than 2 seeds at the reference width)."]
    return out + [""]


def summary_lines(runs: list[Run]) -> list[str]:
    found = _found(runs)
    out = [f"## {HEADING}", ""] if found else []
    for run, d in found:
        kc = d["k_c"]
        out += [f"{run.label}: eNTK ({d['kernel']} kernel, {d['output']} output of class {d['ntk_class']}, "
                f"{d['points']} points), averaged over seeds per width; C({kc}) of the ±1 target; ΔC({kc}) = "
                f"C_ref({kc}) − C_N({kc}); eigenvalue discrepancy = RMS over k ≤ {d['k_max']} of "
                f"log(λ_k/tr)_N − log(λ_k/tr)_ref; kernel regression = ridge regression (ridge {d['ridge']:g} × "
                f"mean diagonal) of the target with the seed-averaged kernel of that step (at the final step the "
                f"ensemble after-kernel) on {d['n_train']} points, tested on {d['points'] - d['n_train']}. "
                f"[95%]: expanded basic bootstrap over seeds ({d['n_boot']} resamples), clipped to the "
                f"statistic's range; resamples repeat seeds, which adds seed noise to the averaged kernel, so "
                f"for the noise-lifted discrepancy the reflected interval runs low: read it against the "
                f"halves baseline. The halves columns "
                f"compare N's half B of the seeds with the reference's half A (the baseline's ensemble sizes; "
                f"one split, no interval); the all-seed columns average twice as many seeds, so their noise "
                f"floor is about 1/√2 of the baseline's.", ""]
        for e in _steps(run, d):
            out += _table(e)
    return out


def summary_json(runs: list[Run]) -> dict:
    out = {}
    keep = ("width", "n_seeds", "reference", "c_k", "c_k_ci", "delta_c", "delta_c_ci", "halves_delta_c",
            "discrepancy", "discrepancy_ci", "halves_discrepancy", "bias_sq_debiased", "bias_sq_debiased_ci",
            "test_mse", "test_mse_ci", "test_sign_error", "test_sign_error_ci", "eigenvalues_norm", "task_power")
    for run, d in _found(runs):
        out[run.label] = {"k_c": d["k_c"], "k_max": d["k_max"], "points": d["points"], "n_train": d["n_train"],
                          "ridge": d["ridge"], "n_boot": d["n_boot"], "kernel": d["kernel"],
                          "ntk_class": d["ntk_class"], "step": d["step"],
                          "steps": [{"step": e["step"], "baseline": e["baseline"],
                                     "widths": [{k: r.get(k) for k in keep} for r in e["widths"]]}
                                    for e in _steps(run, d)]}
    return out
