"""Point-wise agreement: per-example true logits of each width against the reference at three steps, and per-example trajectories of a few probe points across widths.

The section's protocol (report/sections.py): FIGURES {file name: draw(runs, path) -> path or
None}, summary_lines(runs) -> summary.md lines, summary_json(runs) -> summary.json's
"paper"["pointwise"] (empty when the runs hold nothing for it).

    pointwise.png               per width, the seed-mean true logit of every stored probe point
                                (y) against the reference width's (x) at three evaluations: the
                                first after step 0, the middle one of the schedule and the last
    pointwise_trajectories.png  the true logit of 6 fixed probe points against tokens, per width
                                (seed mean, band = min..max over seeds)

Points are the signatures' stored probe points (stats/signature.py: probe tokens of a language
model), the same for every width and seed. The numbers (summary.md, summary.json):
- the point-wise RMSE ||f̄_N - f̄_ref||_rms between the seed-ensemble means over every stored
  point, with its 95% bootstrap interval over seeds (log-scale basic, stats/ensemble.py
  SeedEnsembles.mean_rmse; it still holds V_N/S_N + V_ref/S_ref of seed noise), at the three steps;
- the early regime: V_N (the loop's ensemble rows) at step 0 and the first evaluations, its
  minimum over the run and the last value. A random readout starts every width at its
  initialization variance; the paper's LM figure shows it dip in the first ~5e6 tokens.
In a depth sweep everything is drawn at the reference depth (report/reader.py all_rows).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from fastwidth.report._plotbase import _save, _tokens_axis, plt, width_colors
from fastwidth.report.intervals import with_interval
from fastwidth.report.reader import Run
from fastwidth.run import MemberSpec
from fastwidth.stats.ensemble import MIN_SEEDS_CI, MIN_SEEDS_VARIANCE_CI, SeedEnsembles
from fastwidth.stats.signature import strided_index

MAX_POINTS = 2000      # plotted points per panel (strided, the same for every width)
N_PROBES = 6           # probe points followed in pointwise_trajectories.png
N_EARLY = 5            # evaluations after step 0 that summary's early regime lists
N_BOOT = 1000
STEP_NAMES = ("early", "middle", "last")


# --------------------------------------------------------------------------- data

def _seeds(run: Run) -> list[int]:
    return sorted({r["seed"] for r in run.rows("eval") if r.get("seed", -1) >= 0})


def _tokens(run: Run) -> dict[int, int]:
    """{step: tokens} of the evaluations."""
    return {r["step"]: r["tokens"] for r in run.rows("eval")}


def _name(run: Run, width: int, seed: int) -> str:
    return MemberSpec(width, run.chosen_lr, seed, run.ref_depth).name


def true_logits(run: Run, step: int) -> dict[int, np.ndarray]:
    """{width: (S, P) true logits of its seeds at `step`} for widths whose every seed has a
    signature there ({} when the reference width has none)."""
    out = {}
    for w in run.widths:
        got = [run.signature(_name(run, w, s), step) for s in _seeds(run)]
        got = [g[0]["true_logit"] for g in got if g and "true_logit" in g[0]]
        if got and len(got) == len(_seeds(run)):
            out[w] = np.stack([np.asarray(t, dtype=np.float64) for t in got])
    return out if run.ref_width in out else {}


def signature_steps(run: Run) -> list[int]:
    """The evaluated steps whose signatures hold the reference width's true logits, ascending."""
    seeds = _seeds(run)
    if not seeds:
        return []
    have = run.signatures.get(_name(run, run.ref_width, seeds[0]), {})
    return sorted(s for s in _tokens(run) if s in have)


def three_steps(steps: list[int]) -> tuple[int, int, int] | None:
    """(early, middle, last): the first evaluation after step 0, the middle one of those after
    step 0 (on a log schedule the middle in log tokens) and the last; None with fewer than 3."""
    after = [s for s in sorted(steps) if s > 0]
    if len(after) < 3:
        return None
    return after[0], after[len(after) // 2], after[-1]


def mean_rmse(true: dict[int, np.ndarray], ref: int) -> dict[int, tuple[float, list | None]]:
    """{width: (RMSE between the seed-mean true logits of the width and of `ref`, 95% interval)}
    over every point; the interval is a bootstrap over seeds (SeedEnsembles.mean_rmse), None with
    fewer than MIN_SEEDS_CI seeds at some width."""
    means = {w: t.mean(0) for w, t in true.items()}
    out = {w: (float(np.sqrt(np.mean((means[w] - means[ref]) ** 2))), None) for w in true if w != ref}
    if min(t.shape[0] for t in true.values()) >= MIN_SEEDS_CI:
        est = SeedEnsembles({w: torch.from_numpy(t) for w, t in true.items()},
                            {w: list(range(t.shape[0])) for w, t in true.items()}, ref)
        for w, (v, ci) in est.mean_rmse(N_BOOT).items():
            out[w] = (out[w][0], ci)
    return out


def early_variance(run: Run) -> dict[int, dict]:
    """{width: {steps, tokens, seed_variance, seed_variance_ci, min_step, min, last}} from the
    ensemble rows: V_N at step 0 and the first N_EARLY evaluations, its minimum over the run and
    its last value ({} without ensemble rows: fewer than 2 seeds)."""
    by_w: dict[int, list[dict]] = {}
    for r in run.rows("ensemble"):
        if isinstance(r.get("seed_variance"), (int, float)) and math.isfinite(r["seed_variance"]):
            by_w.setdefault(r["width"], []).append(r)
    out = {}
    for w, rows in sorted(by_w.items()):
        rows.sort(key=lambda r: r["step"])
        first = rows[:N_EARLY + 1]
        low = min(rows, key=lambda r: r["seed_variance"])
        out[w] = {"steps": [r["step"] for r in first], "tokens": [r["tokens"] for r in first],
                  "seed_variance": [r["seed_variance"] for r in first],
                  "seed_variance_ci": [r.get("seed_variance_ci") for r in first],
                  "n_seeds": rows[-1].get("n_seeds"), "min_step": low["step"], "min_tokens": low["tokens"],
                  "min": low["seed_variance"], "last_step": rows[-1]["step"], "last": rows[-1]["seed_variance"]}
    return out


def _subset(true: dict[int, np.ndarray]) -> np.ndarray:
    n = next(iter(true.values())).shape[1]
    return strided_index(n, MAX_POINTS).numpy()


def _seeds_word(n: int) -> str:
    return f"mean of {n} seeds" if n > 1 else "1 seed"


# --------------------------------------------------------------------------- figures

def _found(runs: list[Run]) -> list[tuple[Run, tuple[int, int, int]]]:
    out = []
    for run in runs:
        picked = three_steps(signature_steps(run))
        # every seed of the reference width at each picked step (a member stopped early, a lost
        # signature leave true_logits empty: nothing to draw for the run)
        if picked is not None and len(run.widths) > 1 and all(true_logits(run, s) for s in picked):
            out.append((run, picked))
    return out


def pointwise_scatter(runs: list[Run], path: Path) -> Path | None:
    """pointwise.png (module docstring): one row of three panels per run."""
    found = _found(runs)
    if not found:
        return None
    fig, axes = plt.subplots(len(found), 3, figsize=(15.6, 4.6 * len(found)), squeeze=False)
    for row, (run, picked) in enumerate(found):
        colors, tokens, n_seeds = width_colors(run.widths), _tokens(run), len(_seeds(run))
        for col, (what, step) in enumerate(zip(STEP_NAMES, picked)):
            ax = axes[row][col]
            true = true_logits(run, step)
            if not true:
                ax.set_axis_off()
                continue
            idx, ref = _subset(true), run.ref_width
            x = true[ref].mean(0)[idx]
            rmse = mean_rmse(true, ref)
            for w in sorted(true):
                if w == ref:
                    continue
                ax.scatter(x, true[w].mean(0)[idx], s=3, alpha=0.35, color=colors[w], lw=0,
                           label=f"N={w}: RMSE {rmse[w][0]:.3g}")
            lo, hi = ax.get_xlim()
            lo, hi = min(lo, ax.get_ylim()[0]), max(hi, ax.get_ylim()[1])
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="identity")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_xlabel(f"true logit, reference N={ref} (nats)")
            ax.set_ylabel("true logit, narrower width (nats)")
            ax.set_title(f"{run.label}: {what}, step {step} ({tokens.get(step, 0):.3g} tokens)\n"
                         f"{len(idx)} probe points, {_seeds_word(n_seeds)} per width", fontsize=9)
            ax.grid(True, alpha=0.3)
            leg = ax.legend(fontsize=7, markerscale=3, loc="upper left")
            for h in leg.legend_handles:
                h.set_alpha(1.0)
    return _save(fig, path)


def trajectories(runs: list[Run], path: Path) -> Path | None:
    """pointwise_trajectories.png (module docstring): N_PROBES panels per run, in rows of three."""
    found = _found(runs)
    if not found:
        return None
    rows_per = math.ceil(N_PROBES / 3)
    fig, axes = plt.subplots(rows_per * len(found), 3, figsize=(15.6, 3.6 * rows_per * len(found)), squeeze=False)
    for k, (run, _) in enumerate(found):
        steps = signature_steps(run)
        tokens, colors, n_seeds = _tokens(run), width_colors(run.widths), len(_seeds(run))
        per_step = {s: true_logits(run, s) for s in steps}
        per_step = {s: t for s, t in per_step.items() if t}
        log_x = run.config.get("stats", {}).get("schedule") == "log"
        shown = [s for s in per_step if not log_x or tokens[s] > 0]
        probes = strided_index(next(iter(per_step.values()))[run.ref_width].shape[1], N_PROBES).numpy()
        for j, point in enumerate(probes):
            ax = axes[k * rows_per + j // 3][j % 3]
            for w in run.widths:
                pts = [(tokens[s], per_step[s][w][:, point]) for s in shown if w in per_step[s]]
                if not pts:
                    continue
                t = [p[0] for p in pts]
                ax.plot(t, [p[1].mean() for p in pts], "-", color=colors[w], lw=1.2, label=f"N={w}")
                if n_seeds > 1:
                    ax.fill_between(t, [p[1].min() for p in pts], [p[1].max() for p in pts],
                                    color=colors[w], alpha=0.15, lw=0)
            if log_x:
                _tokens_axis(ax, run)
            else:
                ax.set_xlabel("tokens (training targets seen)")
                ax.grid(True, alpha=0.3)
            ax.set_ylabel("true logit (nats)")
            ax.set_title(f"{run.label}: probe point {int(point)}\n{_seeds_word(n_seeds)}"
                         + (", band = min..max over seeds" if n_seeds > 1 else "")
                         + ("; step 0 not on the log axis" if log_x else ""), fontsize=8)
        axes[k * rows_per][0].legend(fontsize=7, title="width", title_fontsize=7)
        for j in range(N_PROBES, rows_per * 3):
            axes[k * rows_per + j // 3][j % 3].set_axis_off()
    return _save(fig, path)


FIGURES = {"pointwise.png": pointwise_scatter, "pointwise_trajectories.png": trajectories}


# --------------------------------------------------------------------------- numbers

def run_numbers(run: Run) -> dict:
    """The point-wise RMSE per width at the three steps and the early V_N ({} when not drawable)."""
    found = _found([run])
    if not found:
        return {}
    picked = found[0][1]
    tokens, n_seeds = _tokens(run), len(_seeds(run))
    rmse: dict[int, dict] = {}
    for what, step in zip(STEP_NAMES, picked):
        for w, (v, ci) in mean_rmse(true_logits(run, step), run.ref_width).items():
            rmse.setdefault(w, {})[what] = {"step": step, "tokens": tokens.get(step), "value": v, "ci": ci}
    why = None if n_seeds >= MIN_SEEDS_CI else f"not identified: {n_seeds} seed(s) < {MIN_SEEDS_CI}"
    return {"label": run.label, "ref_width": run.ref_width, "n_seeds": n_seeds,
            "steps": dict(zip(STEP_NAMES, picked)), "rmse_ci_reason": why,
            "rmse": [{"width": w, **d} for w, d in sorted(rmse.items())],
            "early_variance": [{"width": w, **d} for w, d in early_variance(run).items()]}


def _ci(v: float, ci: list | None, why: str | None) -> str:
    return with_interval(v, ci, ".4g", no_ci=f" (interval {why or 'not identified'})")


def summary_lines(runs: list[Run]) -> list[str]:
    nums = [n for n in (run_numbers(r) for r in runs) if n]
    if not nums:
        return []
    out = ["## Point-wise true logits (pointwise.png)", "",
           "RMSE over the stored probe points between the seed-mean true logits of width N and of the "
           "reference, at the first evaluation after step 0, the middle one and the last, with 95% bootstrap "
           "intervals over seeds (basic, on the log scale); it holds V_N/S_N + V_ref/S_ref of seed noise, so it is an upper "
           "bound on the bias b. pointwise_trajectories.png follows 6 probe points across training.", ""]
    for n in nums:
        s = n["steps"]
        out += [f"{n['label']} ({n['n_seeds']} seeds, reference N={n['ref_width']}):", "",
                f"| width | early (step {s['early']}) | middle (step {s['middle']}) | last (step {s['last']}) |",
                "|---:|---|---|---|"]
        for r in n["rmse"]:
            out.append(f"| {r['width']} | " + " | ".join(_ci(r[k]["value"], r[k]["ci"], n["rmse_ci_reason"])
                                                        for k in STEP_NAMES if k in r) + " |")
        out.append("")
        if n["early_variance"]:
            ev = n["early_variance"]
            few = ev[0]["n_seeds"] is not None and ev[0]["n_seeds"] < MIN_SEEDS_VARIANCE_CI
            out += ["Early regime: seed variance V_N of the true logit at step 0 and the first evaluations, its "
                    "minimum over the run and its last value" + (
                        f" (no per-width interval: {ev[0]['n_seeds']} seeds < {MIN_SEEDS_VARIANCE_CI})" if few else
                        " (95% intervals over seeds in summary.json)") + ":", "",
                    "| width | " + " | ".join(f"step {s}" for s in ev[0]["steps"]) + " | min (step) | last |",
                    "|---:|" + "---:|" * (len(ev[0]["steps"]) + 2)]
            for e in ev:
                out.append(f"| {e['width']} | " + " | ".join(f"{v:.4g}" for v in e["seed_variance"])
                           + f" | {e['min']:.4g} ({e['min_step']}) | {e['last']:.4g} |")
            out.append("")
    return out


def summary_json(runs: list[Run]) -> dict:
    nums = [n for n in (run_numbers(r) for r in runs) if n]
    return {"runs": nums} if nums else {}
