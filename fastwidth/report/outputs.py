"""V_N for three outputs: the raw true logit, the centered true logit z_y - mean_c z_c and log p_y, so a flattening caused by the softmax-invariant shift is told from a real one.

    doc = outputs_numbers(run)   # {"final": {...}, "late": {...}} per output, or None (module notes)

A per-seed shift c·1 of every logit changes z_y but not z_y - mean_c z_c nor log p_y: where only
the raw V_N flattens in width, the flattening is that shift; where all three flatten, it is real.
The numbers are the loop's estimator (stats/ensemble.py SeedEnsembles, the fit rows' fields
seed_variance_<output> and variance_slope_<output>), recomputed here from the stored signatures
at every evaluation (stats/ensemble.py output_values), so a run written before the centered logit
existed still gets it where its signatures hold logits (classifiers). Two windows: the final
evaluation (the fits table's) and the late mean (V_N averaged over the evaluations in the last
25% of tokens, the report's late window; its slope's interval resamples the seeds once for
every evaluation, stats/ensemble.py late_variance_slope). Intervals: 95% basic bootstrap over
seeds (stats.bootstrap resamples), none with fewer than 3 seeds (the slope) or 4 (a width's V_N).

The section's protocol (report/sections.py): FIGURES {file name: draw(runs, path) -> path or
None}, summary_lines(runs) -> summary.md lines, summary_json(runs) -> summary.json's
"paper"["outputs"] (empty when the runs hold nothing for it).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from fastwidth.report._plotbase import _loglog_axes, _panels, _save, min_log_span
from fastwidth.report.intervals import with_interval
from fastwidth.report.reader import Run
from fastwidth.stats.ensemble import (MIN_SEEDS_VARIANCE_CI, OUTPUT_SUFFIXES, SeedEnsembles, late_variance_slope,
                                      output_values)

NAMES = {"": "raw true logit z_y", "_centered": "centered z_y − mean_c z_c", "_logp": "log p_y"}
KEYS = {"": "raw", "_centered": "centered", "_logp": "logp"}     # summary.json's names of the outputs
COLORS = {"": "tab:blue", "_centered": "tab:orange", "_logp": "tab:green"}
TAIL = 0.25                                                      # the report's late window (reader.late_mean)


def _seeds(run: Run) -> list[int]:
    return sorted({r["seed"] for r in run.rows("eval") if r.get("seed", -1) >= 0})


def _values(run: Run, step: int, seeds: list[int]) -> dict[str, dict[int, torch.Tensor]]:
    """{suffix: {width: (S, P) values}} at `step` for the outputs every member's signature holds."""
    sigs = {}
    for w in run.widths:
        got = [run.signature(run.member_name(w, s), step) for s in seeds]
        if any(g is None for g in got):
            return {}
        sigs[w] = [g[0] for g in got]
    out = {}
    for suffix in OUTPUT_SUFFIXES:
        vals = {w: [output_values(s, suffix) for s in ss] for w, ss in sigs.items()}
        if all(v is not None for vs in vals.values() for v in vs):
            out[suffix] = {w: torch.stack(vs) for w, vs in vals.items()}
    return out


def _interval(ci) -> list | None:
    return None if ci is None else [float(ci[0]), float(ci[1])]


def outputs_numbers(run: Run) -> dict | None:
    """{"final": {suffix: {slope, ci, widths: {w: {V_N, ci}}}}, "late": {suffix: {slope, ci, widths: {w: V_N}}},
    final_step, late_steps, n_seeds, missing: [the outputs the signatures cannot form]}; None when the
    run has no ensemble rows or signatures at every member."""
    seeds = _seeds(run)
    steps = sorted({r["step"]: r["tokens"] for r in run.rows("ensemble")}.items())
    if len(seeds) < 2 or not steps or run.ref_width not in run.widths:
        return None
    n_boot = int(run.config.get("stats", {}).get("bootstrap", 1000))
    every = {s: _values(run, s, seeds) for s, t in steps if t >= (1 - TAIL) * steps[-1][1]}
    final_step = steps[-1][0]
    final = every.get(final_step) or {}
    if not final:
        return None
    late_steps = [s for s, v in every.items() if v.keys() == final.keys()]
    by_width = {w: seeds for w in run.widths}
    doc = {"final_step": final_step, "late_steps": late_steps, "n_seeds": len(seeds), "n_boot": n_boot,
           "missing": [KEYS[s] for s in OUTPUT_SUFFIXES if s not in final], "final": {}, "late": {}}
    for suffix, vals in final.items():
        est = SeedEnsembles(vals, by_width, run.ref_width)
        rows, fit = est.width_rows(n_boot), est.fit_row(n_boot)
        doc["final"][suffix] = {"slope": fit["variance_slope"], "ci": _interval(fit["variance_slope_ci"]),
                                "widths": {w: {"V_N": r.get("seed_variance"), "ci": _interval(r.get("seed_variance_ci"))}
                                           for w, r in rows.items()}}
        slope, ci, values = late_variance_slope([every[s][suffix] for s in late_steps], by_width, run.ref_width, n_boot)
        doc["late"][suffix] = {"slope": slope, "ci": _interval(ci), "widths": values}
    return doc


def _slope_text(slope: float, ci) -> str:
    return with_interval(slope, ci, "+.2f", missing="not identified (under 2 widths with a positive V_N)",
                         no_ci=" (no interval: under 3 seeds)")


def _numbers(runs: list[Run]) -> list[tuple[Run, dict]]:
    return [(run, doc) for run in runs if (doc := outputs_numbers(run)) is not None]


def draw_outputs(runs: list[Run], path: Path) -> Path | None:
    got = _numbers(runs)
    if not got:
        return None
    fig, axes = _panels([r for r, _ in got], height=4.4, sharey=False)
    for ax, (run, doc) in zip(axes, got):
        for suffix in doc["final"]:
            fin, late = doc["final"][suffix], doc["late"][suffix]
            ws = sorted(fin["widths"])
            v = [fin["widths"][w]["V_N"] for w in ws]
            cis = [fin["widths"][w]["ci"] for w in ws]
            err = [[max(y - c[0], 0) if c else 0 for y, c in zip(v, cis)], [max(c[1] - y, 0) if c else 0 for y, c in zip(v, cis)]]
            ax.errorbar(ws, v, yerr=err, fmt="o-", color=COLORS[suffix], capsize=3,
                        label=f"{NAMES[suffix]}, step {doc['final_step']}: slope {_slope_text(fin['slope'], fin['ci'])}")
            if len(doc["late_steps"]) > 1:
                ax.plot(ws, [late["widths"][w] for w in ws], "s--", color=COLORS[suffix], mfc="none", alpha=0.8,
                        label=f"{NAMES[suffix]}, late mean: slope {_slope_text(late['slope'], late['ci'])}")
        ref = min(ws)
        y0 = doc["final"][next(iter(doc["final"]))]["widths"][ref]["V_N"]
        if y0 and y0 > 0:
            ax.plot(ws, [y0 * ref / w for w in ws], ":", color="gray", label="∝ 1/N")
        _loglog_axes(ax, ws)
        min_log_span(ax)
        ax.set_ylabel("seed variance V_N (logit units², nats² for log p_y)")
        missing = f"; not formed: {', '.join(doc['missing'])}" if doc["missing"] else ""
        per_width = "" if doc["n_seeds"] >= MIN_SEEDS_VARIANCE_CI else f" (of the slopes; a width's V_N needs {MIN_SEEDS_VARIANCE_CI} seeds)"
        ax.set_title(f"{run.label}: {doc['n_seeds']} seeds, 95% bootstrap intervals over seeds{per_width}{missing}",
                     fontsize=8)
        ax.legend(fontsize=6, loc="best")
    return _save(fig, path)


FIGURES = {"vn_outputs.png": draw_outputs}


def summary_lines(runs: list[Run]) -> list[str]:
    got = _numbers(runs)
    if not got:
        return []
    lines = ["## V_N for three outputs (vn_outputs.png)", "",
             "Seed variance V_N of three per-point outputs and its log-log slope on width, at the final evaluation "
             "and averaged over the late evaluations (last 25% of tokens), with 95% bootstrap intervals over seeds. "
             "A per-seed shift of every logit (softmax-invariant) is in the raw true logit only: where the raw slope "
             "is flat and the centered and log p_y slopes are not, the flattening is that shift.", "",
             "| run | output | slope (final) | slope (late mean) | " + " | ".join(f"V_N at {w}" for w in got[0][0].widths) + " |",
             "|---|---|---|---|" + "---|" * len(got[0][0].widths)]
    for run, doc in got:
        for suffix, fin in doc["final"].items():
            late = doc["late"][suffix]
            cells = []
            for w in run.widths:
                v = fin["widths"].get(w, {})
                ci = v.get("ci")
                text = "–" if v.get("V_N") is None else f"{v['V_N']:.3g}"
                cells.append(text + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""))
            lines.append(f"| {run.label} | {NAMES[suffix]} | {_slope_text(fin['slope'], fin['ci'])} | "
                         f"{_slope_text(late['slope'], late['ci'])} | " + " | ".join(cells) + " |")
        if doc["missing"]:
            lines.append(f"| {run.label} | {', '.join(doc['missing'])} | not formed: the signatures hold neither "
                         "centered_true_logit nor logits (a language model's written before they did) | | |")
    lines += ["", "Final step and late steps: " + "; ".join(f"{run.label}: {doc['final_step']}, {doc['late_steps']}"
                                                         for run, doc in got), ""]
    return lines


def summary_json(runs: list[Run]) -> dict:
    got = _numbers(runs)
    out = {}
    for run, doc in got:
        out[run.label] = {"final_step": doc["final_step"], "late_steps": doc["late_steps"], "n_seeds": doc["n_seeds"],
                          "missing": doc["missing"],
                          **{KEYS[s]: {"final": {"slope": _json(doc["final"][s]["slope"]), "slope_ci": doc["final"][s]["ci"],
                                                 "widths": [{"width": w, "seed_variance": _json(v["V_N"]),
                                                             "seed_variance_ci": v["ci"]}
                                                            for w, v in sorted(doc["final"][s]["widths"].items())]},
                                       "late": {"slope": _json(doc["late"][s]["slope"]), "slope_ci": doc["late"][s]["ci"],
                                                "widths": [{"width": w, "seed_variance": _json(v)}
                                                           for w, v in sorted(doc["late"][s]["widths"].items())]}}
                             for s in doc["final"]}}
    return out


def _json(v):
    return None if v is None or not math.isfinite(v) else float(v)
