"""The eNTK across seeds and widths, read from the kernels a run stored (signatures/<member>/
ntk_step_*.safetensors), and its figure. The math is stats/ntk_across.py.

    numbers = ntk_across_run(run)     # None when the run stored no eNTK; else stats' dict + step, kernel
    ntk_alignment(runs, out / "ntk_alignment.png")
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fastwidth.report.reader import Run  # noqa: E402
from fastwidth.stats.ntk_across import NTKMember, ntk_across_widths  # noqa: E402
from fastwidth.run import RunDir  # noqa: E402
from fastwidth.stats.signature import load_signature  # noqa: E402

_CACHE: dict[tuple, dict | None] = {}


def _members_in_view(run: Run) -> set[str]:
    """Member names whose rows the report keeps (not diverged; the chosen LR of an LR sweep)."""
    pairs = {(r["width"], r["seed"]) for r in run.rows("eval")}
    return {run.member_name(w, s) for w, s in pairs}


def ntk_steps(run: Run) -> tuple[dict[str, dict[int, Path]], list[int]]:
    """The kept members' stored eNTK files {name: {step: path}} and the steps every one of them stored."""
    files = {n: steps for n, steps in RunDir(run.path).list_ntk().items() if n in _members_in_view(run)}
    common = set.intersection(*(set(steps) for steps in files.values())) if files else set()
    return files, sorted(common)


def ntk_members(run: Run, step: int | None = None) -> tuple[int, list[NTKMember], list[dict]] | None:
    """(step, members, their files' metadata) of the kept members' eNTK at `step` (default: the last
    step every kept member stored); None when there is none."""
    files, common = ntk_steps(run)
    step = common[-1] if step is None and common else step
    if step is None or step not in common:
        return None
    members, metas = [], []
    for name in sorted(files):
        t, meta = load_signature(files[name][step])
        metas.append(meta)
        members.append(NTKMember(int(meta["width"]), int(meta["seed"]), t["kernel"], t["eigenvectors"],
                                 t["labels"], int(meta["ntk_class"])))
    return step, members, metas


def ntk_across_run(run: Run) -> dict | None:
    """Seed-averaged eNTK spectra and principal angles at the last step every kept member stored."""
    files, common = ntk_steps(run)
    if not common:
        return None
    step = common[-1]
    key = (str(run.path), step, tuple(sorted(files)))
    if key not in _CACHE:
        _, members, metas = ntk_members(run, step)
        ref = run.ref_width if any(m.width == run.ref_width for m in members) else max(m.width for m in members)
        out = ntk_across_widths(members, ref)
        out.update(step=step, kernel=metas[0].get("kernel"), output=metas[0].get("output"),
                   method=sorted({m.get("method") for m in metas}))
        _CACHE[key] = out
    return _CACHE[key]


def ntk_lines(run: Run) -> list[str]:
    """summary.md: one table of the alignment with the reference width's eNTK."""
    d = ntk_across_run(run)
    if not d:
        return []
    k = d["k"]
    out = [f"eNTK ({d['kernel']} kernel, {d['output']} output, {d['points']} points, step {d['step']}): top-{k} "
           f"eigenspaces against width {d['ref_width']}; mean cos² of the principal angles (1 = same space), "
           f"same seed (mean over seeds), between seed-averaged kernels, and between averaged kernels of "
           f"half the seeds (this width's second half against the reference's first: the sizes of the "
           f"reference width's own half-vs-half row); task power C({k}) of the averaged "
           f"kernel (class {d['ntk_class']}, and the mean over classes one-vs-rest):", "",
           f"| width | seeds | same-seed mean cos² | averaged-kernel mean cos² | half-vs-half mean cos² | "
           f"C({k}) | mean_c C_c({k}) |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in d["widths"]:
        f = lambda v: "–" if v is None else f"{v:.4f}"   # noqa: E731
        out.append(f"| {r['width']}{' (ref)' if r['reference'] else ''} | {r['n_seeds']} | "
                   f"{f(r.get('same_seed_mean_cos2'))} | {f(r.get('ensemble_mean_cos2'))} | "
                   f"{f(r.get('halves_mean_cos2'))} | "
                   f"{f(r['task_power'][k - 1])} | {f(r['task_power_class_mean'][k - 1])} |")
    return out + _baseline_lines(d) + [""]


def _baseline_lines(d: dict) -> list[str]:
    """The "ref width, other seeds" row under the eNTK table, and a warning when k fills the space."""
    b, f = d.get("same_width_baseline"), lambda v: "–" if v is None else f"{v:.4f}"   # noqa: E731
    out = []
    if b and "note" not in b:
        out.append(f"| {b['width']} (ref), other seeds: {b['n_pairs']} seed pairs; mean kernels of seeds "
                   f"{b['half_a']} vs {b['half_b']} | {len(b['seeds'])} | {f(b['pairs_mean_cos2'])} | – | "
                   f"{f(b['halves_mean_cos2'])} | – | – |")
    elif b:
        out += ["", f"Same-width baseline: none ({b['note']})."]
    if d["k"] >= d["points"]:
        out += ["", f"k = {d['k']} of {d['points']} points: a top-k eigenspace is the whole space, so every "
                "cos² is 1 by construction; store fewer eigenvectors (stats.ntk_top_k) or more points "
                "(stats.ntk_points)."]
    elif b and "note" not in b:
        out += ["", f"The other-seeds row is what seed noise alone leaves at this seed count, to read the "
                f"same-seed and half-vs-half columns against (random {d['k']}-dimensional spaces give k/n = "
                f"{d['k'] / d['points']:.3f}); the all-seed averaged kernels have no same-width twin."]
    return out


def _baseline(ax, b: dict | None, pair_color, half_color) -> None:
    """Dashed lines: the reference width's seed pairs and its two half-ensembles (same_width_baseline)."""
    if not b or "note" in b:
        return
    if pair_color is not None:
        ax.axhline(b["pairs_mean_cos2"], color=pair_color, ls="--", lw=1,
                   label=f"same width, other seeds (N={b['width']}, {b['n_pairs']} pairs)")
    if half_color is not None:
        ax.axhline(b["halves_mean_cos2"], color=half_color, ls="--", lw=1,
                   label=f"same width, other seeds (seeds {b['half_a']} vs {b['half_b']}, averaged)")


def ntk_alignment(runs: list[Run], path: Path) -> Path | None:
    """Left: mean cos² of the principal angles with the reference width's top-k eNTK eigenspace vs
    width (same-seed pairs: mean and min-max over seeds; seed-averaged kernels; averaged kernels of
    half the seeds), and dashed, the reference width's own seeds against each other. Right: C(k) of
    the seed-averaged kernels, one line per width."""
    from fastwidth.report._plotbase import _save, _width_ticks, width_colors

    found = [(run, ntk_across_run(run)) for run in runs]
    found = [(r, d) for r, d in found if d]
    if not found:
        return None
    fig, axes = plt.subplots(len(found), 2, figsize=(10.5, 3.8 * len(found)), squeeze=False)
    for (run, d), (ax_a, ax_c) in zip(found, axes):
        rows = [r for r in d["widths"] if not r["reference"]]
        ws = [r["width"] for r in rows]
        same = [[p["mean_cos2"] for p in r["same_seed"]] for r in rows]
        have = [(w, v) for w, v in zip(ws, same) if v]
        if have:
            x, v = zip(*have)
            mean = [sum(s) / len(s) for s in v]
            err = [[m - min(s) for m, s in zip(mean, v)], [max(s) - m for m, s in zip(mean, v)]]
            pair_color = ax_a.errorbar(x, mean, yerr=err, fmt="-o", capsize=3,
                                       label="same seed (mean, min-max)")[0].get_color()
        ax_a.plot(ws, [r["ensemble_mean_cos2"] for r in rows], "-s", label="seed-averaged kernels")
        half = [(r["width"], r["halves_mean_cos2"]) for r in rows if r.get("halves_mean_cos2") is not None]
        half_color = None
        if half:
            half_color = ax_a.plot(*zip(*half), "-^", label="averaged kernels, half the seeds each")[0].get_color()
        _baseline(ax_a, d.get("same_width_baseline"), pair_color if have else None, half_color)
        ax_a.set_xscale("log", base=2)
        _width_ticks(ax_a, ws + [d["ref_width"]])
        ax_a.set_ylim(0, 1.02)
        ax_a.set_xlabel("width N")
        ax_a.set_ylabel(f"mean cos² of principal angles (top {d['k']})")
        ax_a.set_title(f"{run.label}: eNTK eigenspace vs N={d['ref_width']} ({d['kernel']}, step {d['step']})",
                       fontsize=9)
        ax_a.grid(True, alpha=0.3)
        ax_a.legend(fontsize=7)
        colors = width_colors([r["width"] for r in d["widths"]])
        for r in d["widths"]:
            c = np.asarray(r["task_power"], float)
            ax_c.plot(np.arange(1, len(c) + 1), c, "-", color=colors[r["width"]],
                      label=f"N={r['width']} ({r['n_seeds']} seeds)")
        ax_c.axvline(d["k"], color="gray", ls=":", lw=1)
        ax_c.set_xscale("log")
        ax_c.set_ylim(0, 1.02)
        ax_c.set_xlabel("k")
        ax_c.set_ylabel(f"C(k), class {d['ntk_class']}")
        ax_c.set_title(f"{run.label}: task power of the seed-averaged eNTK", fontsize=9)
        ax_c.grid(True, which="both", alpha=0.3)
        ax_c.legend(fontsize=7)
    return _save(fig, path)
