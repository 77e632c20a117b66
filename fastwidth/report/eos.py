"""Edge of stability with seeds: per width the onset of λη ≥ 2, the mean distance from the edge over the plateau and each catapult, with intervals over seeds.

    table = eos_table(run)                 # per (learning rate, width): onset, plateau, catapults
    onset_step(steps, x); plateau(steps, x, onset); catapults(steps, losses, factor)

The quantity is x = 2·sharpness/edge from the "batch_sharpness" rows (stats/training_rows.py):
the top eigenvalue of P^{1/2} H P^{1/2} on the training batch, with the optimizer's edge put at 2.
Under gradient descent (edge = 2/η) x is λη itself; under Adam it is λ_P·2/threshold with the
threshold (2+2β1)/(1-β1) (38 at β1 = 0.9, Cohen et al. 2022) and P = η/(√v̂+ε). Definitions:
- onset: the first measured step with x >= 2 (n/a when a seed never reaches it);
- plateau: every measured step from the onset to the last one; its mean |x − 2| (and mean x);
- catapult: a stretch of the training loss (the "train" rows) above CATAPULT_FACTOR × its running
  minimum (the lowest loss of the earlier steps); it ends when the loss is back below that bar.
  Its height is the peak loss / that running minimum, its step the peak's.
Intervals: basic bootstrap over seeds (stats/ensemble.py tail_mean_ci, MIN_SEEDS_CI seeds at
least); a catapult index (1st, 2nd, ...) gets a value only when every seed has one ("n/a" with the
count otherwise).

The section's protocol (report/sections.py): FIGURES {file name: draw(runs, path) -> path or
None}, summary_lines(runs) -> summary.md lines, summary_json(runs) -> summary.json's
"paper"["eos"] (empty when the runs hold nothing for it).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from fastwidth.report.intervals import with_interval
from fastwidth.report.reader import Run, at_reference_depth
from fastwidth.stats.ensemble import MIN_SEEDS_CI, tail_mean_ci

EDGE = 2.0
CATAPULT_FACTOR = 2.0   # a catapult: the loss above 2× its running minimum


def onset_step(steps: list[int], x: list[float]) -> int | None:
    """The first step with x >= EDGE; None when none."""
    return next((s for s, v in zip(steps, x) if v >= EDGE), None)


def plateau(steps: list[int], x: list[float], onset: int | None) -> dict:
    """{"mean_abs": mean |x − 2|, "mean": mean x, "points"} over the steps from `onset` to the end."""
    if onset is None:
        return {"mean_abs": math.nan, "mean": math.nan, "points": 0}
    vals = np.asarray([v for s, v in zip(steps, x) if s >= onset], dtype=np.float64)
    return {"mean_abs": float(np.mean(np.abs(vals - EDGE))), "mean": float(vals.mean()), "points": int(vals.size)}


def catapults(steps: list[int], losses: list[float], factor: float = CATAPULT_FACTOR) -> list[dict]:
    """Each stretch where the loss exceeds `factor` × its running minimum: [{"step": the peak's step,
    "height": peak / running minimum, "start": first step above the bar}]."""
    out, low, event = [], math.inf, None
    for s, v in zip(steps, losses):
        if not math.isfinite(v):
            continue
        if event is None and v > factor * low:
            event = {"start": s, "step": s, "peak": v, "low": low}
        elif event is not None and v > event["peak"]:
            event.update(step=s, peak=v)
        if event is not None and v <= factor * event["low"]:
            out.append(event)
            event = None
        if event is None:
            low = min(low, v)
    if event is not None:
        out.append(event)
    return [{"step": e["step"], "start": e["start"], "height": e["peak"] / e["low"]} for e in out]


def _x(row: dict) -> float | None:
    s, e = row.get("sharpness"), row.get("edge")
    if isinstance(s, (int, float)) and isinstance(e, (int, float)) and e > 0 and math.isfinite(s):
        return EDGE * s / e
    return None


def adam_warmup(run: Run) -> int:
    """The first step the table reads under Adam: 1/(1 − β1) (10 at β1 = 0.9), the horizon of
    Adam's first moment; before it the preconditioner rests on a few batches."""
    b1 = float(((run.config.get("optim") or {}).get("betas") or [0.9, 0.999])[0])
    return max(1, int(math.ceil(1.0 / (1.0 - b1) - 1e-9)))


def trajectories(run: Run) -> dict:
    """{(base_lr, width): {seed: {"steps", "x", "converged", "loss_steps", "loss"}}} from the
    batch_sharpness and train rows (the reference depth's in a depth sweep). Under Adam the rows
    before step adam_warmup(run) are left out: at step 0 there is no v̂ yet (precond "lr", the
    plain-GD quantity), and over the first steps v̂ is the square of a few batches' gradients, so
    P = η/(√v̂+ε) is huge along directions they barely touched (x of 100-500 at step 1 where it is
    0.2-0.4 from step 5 on, measured)."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    rows = at_reference_depth(run, run.sweep_rows)
    adam = any(r.get("precond") == "adam" for r in rows if r.get("kind") == "batch_sharpness")
    first = adam_warmup(run) if adam else 0
    for r in sorted((r for r in rows if r.get("kind") in ("batch_sharpness", "train")), key=lambda r: r["step"]):
        d = out[(r.get("base_lr"), r["width"])][r["seed"]]
        if r["kind"] == "batch_sharpness" and _x(r) is not None and r["step"] >= first:
            d["steps"].append(r["step"])
            d["x"].append(_x(r))
            d["converged"].append(bool(r.get("converged", True)))
        elif r["kind"] == "train" and isinstance(r.get("loss"), (int, float)):
            d["loss_steps"].append(r["step"])
            d["loss"].append(float(r["loss"]))
    return {k: {s: dict(d) for s, d in v.items() if d.get("steps")} for k, v in sorted(
        out.items(), key=lambda kv: (-math.inf if kv[0][0] is None else kv[0][0], kv[0][1]))}


def _mean_ci(values: list[float]) -> dict:
    v, ci = tail_mean_ci(np.asarray(values, dtype=np.float64)[:, None])
    return {"value": v, "ci": ci}


def eos_table(run: Run, factor: float = CATAPULT_FACTOR) -> list[dict]:
    """One dict per (base_lr, width): seeds, onset (per seed and mean with interval), plateau mean
    |x − 2| and mean x, the fraction of converged Lanczos points, catapult counts per seed and per
    catapult index its height and step (value + interval when every seed has it, else None)."""
    table = []
    for (lr, width), seeds in trajectories(run).items():
        per = {}
        for s, d in sorted(seeds.items()):
            on = onset_step(d["steps"], d["x"])
            per[s] = {"onset": on, "plateau": plateau(d["steps"], d["x"], on),
                      "catapults": catapults(d.get("loss_steps", []), d.get("loss", []), factor)}
        n = len(per)
        onsets = [p["onset"] for p in per.values()]
        row = {"base_lr": lr, "width": width, "seeds": n, "onset_per_seed": onsets,
               "converged": float(np.mean([c for d in seeds.values() for c in d["converged"]]))}
        for key, vals in (("onset", onsets), ("plateau_mean_abs", [p["plateau"]["mean_abs"] for p in per.values()]),
                          ("plateau_mean", [p["plateau"]["mean"] for p in per.values()])):
            row[key] = _mean_ci(vals) if all(v is not None for v in onsets) else None
        row["catapult_counts"] = [len(p["catapults"]) for p in per.values()]
        cats = []
        for k in range(max(row["catapult_counts"], default=0)):
            have = [p["catapults"][k] for p in per.values() if len(p["catapults"]) > k]
            entry = {"index": k + 1, "seeds_with": len(have), "height": None, "step": None}
            if len(have) == n:
                entry.update(height=_mean_ci([c["height"] for c in have]), step=_mean_ci([c["step"] for c in have]))
            cats.append(entry)
        row["catapults"] = cats
        table.append(row)
    return table


def _edge_name(run: Run) -> str:
    opt = run.config.get("optim", {})
    if opt.get("name", "adamw") in ("adam", "adamw"):
        b1 = (opt.get("betas") or [0.9])[0]
        return (f"Adam: x = λ_P·2/threshold, threshold (2+2β1)/(1-β1) = {(2 + 2 * b1) / (1 - b1):.3g} "
                f"(β1 = {b1:g}), P = η/(√v̂+ε); the table reads steps from {adam_warmup(run)} = 1/(1-β1) on, "
                f"before which v̂ rests on a few batches (the figure shows them)")
    mu = float(opt.get("momentum", 0.0))
    return "GD: x = λη, the edge 2/η" if mu == 0 else f"GD with momentum {mu:g}: x = λη·2/threshold, threshold 2(1+μ)"


def _fmt(d: dict | None, fmt: str = ".3g", why: str = "n/a") -> str:
    return with_interval(None, None, missing=why) if d is None else with_interval(d["value"], d["ci"], fmt, missing=why)


def _runs(runs: list[Run]) -> list[Run]:
    return [r for r in runs if any(x.get("kind") == "batch_sharpness" for x in r.sweep_rows)]


def summary_lines(runs: list[Run]) -> list[str]:
    runs = _runs(runs)
    if not runs:
        return []
    out = ["## Edge of stability with seeds (eos_seeds.png)", "",
           f"x = 2·sharpness/edge on the training batch (the edge at 2); onset: the first step with x ≥ 2; "
           f"plateau: every measured step from the onset to the last; catapult: the training loss above "
           f"{CATAPULT_FACTOR:g}× its running minimum (height: peak / that minimum, step: the peak's). "
           f"Means over seeds, [95% basic bootstrap over seeds] (none with fewer than {MIN_SEEDS_CI} seeds); "
           f"n/a: not every seed has it. Lanczos converged: the share of points whose top Ritz pair met "
           f"stats.sharpness_tol (an unconverged value is biased low).", ""]
    for run in runs:
        out += [f"{run.path.name} ({_edge_name(run)})", "",
                "| lr | width | seeds | onset step | plateau mean abs(x−2) | plateau mean x | Lanczos converged | "
                "catapults per seed | catapults: height, step |", "|---|---:|---:|---|---|---|---:|---|---|"]
        for r in eos_table(run):
            reach = sum(o is not None for o in r["onset_per_seed"])
            why = f"n/a ({reach}/{r['seeds']} seeds reach 2)"
            cats = "; ".join(f"#{c['index']}: " + (f"{_fmt(c['height'])} at {_fmt(c['step'], '.0f')}" if c["height"]
                                                   else f"n/a ({c['seeds_with']}/{r['seeds']} seeds)")
                             for c in r["catapults"][:4]) or "none"
            if len(r["catapults"]) > 4:
                cats += f"; (+{len(r['catapults']) - 4} more)"
            lr = "–" if r["base_lr"] is None else f"{r['base_lr']:g}"
            out.append(f"| {lr} | {r['width']} | {r['seeds']} | {_fmt(r['onset'], '.0f', why)} | "
                       f"{_fmt(r['plateau_mean_abs'], '.3g', why)} | {_fmt(r['plateau_mean'], '.3g', why)} | "
                       f"{r['converged']:.0%} | {r['catapult_counts']} | {cats} |")
        out.append("")
    return out


def summary_json(runs: list[Run]) -> dict:
    runs = _runs(runs)
    if not runs:
        return {}
    return {"edge": EDGE, "catapult_factor": CATAPULT_FACTOR,
            "runs": [{"run": run.path.name, "edge_is": _edge_name(run), "rows": eos_table(run)} for run in runs]}


def eos_seeds(runs: list[Run], path: Path) -> Path | None:
    """One panel per (run, learning rate): x against step per width, the mean over seeds and the
    seeds' range as a band, the edge at 2, each seed's catapult peaks marked on the width's curve."""
    import matplotlib.pyplot as plt
    from fastwidth.report._plotbase import _save, width_colors
    runs = _runs(runs)
    if not runs:
        return None
    panels = [(run, lr, {w: seeds for (l2, w), seeds in trajectories(run).items() if l2 == lr})
              for run in runs for lr in sorted({k[0] for k in trajectories(run)},
                                               key=lambda v: -math.inf if v is None else v)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.9), squeeze=False)
    for ax, (run, lr, by_w) in zip(axes[0], panels):
        colors = width_colors(run.widths)
        n_seeds = max((len(s) for s in by_w.values()), default=0)
        for w, seeds in sorted(by_w.items()):
            common = sorted(set.intersection(*(set(d["steps"]) for d in seeds.values())))
            m = np.array([[dict(zip(d["steps"], d["x"]))[s] for s in common] for d in seeds.values()])
            ax.plot(common, m.mean(0), "-", lw=1, color=colors.get(w), label=f"N={w}")
            if len(seeds) > 1:
                ax.fill_between(common, m.min(0), m.max(0), color=colors.get(w), alpha=0.2, lw=0)
            for d in seeds.values():
                xs = dict(zip(d["steps"], d["x"]))
                for c in catapults(d.get("loss_steps", []), d.get("loss", [])):
                    near = min(xs, key=lambda s: abs(s - c["step"]))
                    ax.plot([c["step"]], [xs[near]], "v", ms=5, color=colors.get(w), mec="k", mew=0.5)
        ax.axhline(EDGE, color="k", ls="--", lw=1, label="edge (2)")
        ax.plot([], [], "v", color="grey", mec="k", mew=0.5, label=f"catapult (loss > {CATAPULT_FACTOR:g}× run. min)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("x = 2·λ/edge  (GD: λη)")
        unit = " × 2/λ0" if run.config.get("optim", {}).get("lr_unit") == "edge" else ""
        lr_s = "" if lr is None else f", η = {lr:g}{unit}"
        ax.set_title(f"{run.path.name}{lr_s}\nmean over {n_seeds} seed(s), band: seed range", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, path)


FIGURES: dict = {"eos_seeds.png": eos_seeds}
