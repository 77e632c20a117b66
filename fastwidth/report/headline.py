"""The few lines a run prints when it ends: per width its final loss and true-logit RMSE against
the reference, then the fitted slopes with their intervals; read from report/summary.json.

summary.json (written with the report) is, in the part read here:
    {"run": {"optimizer", "lr", "data_source", "commit", ...},
     "widths": [{"width": int, "final_loss": float|null, "true_logit_rmse": float|null, ...}],
     "fits": {"rmse_slope": float, "rmse_slope_ci": [lo, hi], "variance_slope": ..., ...}}
Every key may be missing (a run without statistics has no fits): the lines say "n/a" instead.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from fastwidth.run import RunDir

log = logging.getLogger("fastwidth.report")

FITS = (("rmse_slope", "true-logit RMSE vs width", "the paper's late-time slope is about -0.5"),
        ("variance_slope", "seed variance vs width", "1/width is -1"),
        ("bias_slope", "ensemble bias vs width", ""))


def _num(v, fmt: str = ".4g") -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "n/a"
    return format(v, fmt)


def _interval(ci) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_num(c) != "n/a" for c in ci):
        return f" [{_num(ci[0], '.3f')}, {_num(ci[1], '.3f')}]"
    return ""


def headline_lines(summary: dict, run_dir: str | Path | None = None) -> list[str]:
    """The headline as lines of text, from a summary.json dict (tolerates any missing key)."""
    run = summary.get("run") or {}
    widths = [w for w in summary.get("widths") or [] if isinstance(w, dict) and "width" in w]
    ref = run.get("reference_width") or run.get("ref_width")
    about = ", ".join(f"{k} {run[k]}" for k in ("optimizer", "lr", "data_source") if run.get(k) is not None)
    lines = [f"run {run_dir}" + (f" ({about})" if about else "") if run_dir else (about or "run")]
    if widths:
        lines.append(f"  {'width':>7}  {'final loss':>10}  {'true-logit RMSE vs ' + (str(ref) if ref else 'ref'):>24}")
        for w in sorted(widths, key=lambda w: w["width"]):
            lines.append(f"  {w['width']:>7}  {_num(w.get('final_loss')):>10}  {_num(w.get('true_logit_rmse')):>24}")
    fits = summary.get("fits") or {}
    for key, what, note in FITS:
        if key in fits:
            lines.append(f"  {what} slope {_num(fits.get(key), '.3f')}{_interval(fits.get(key + '_ci'))}"
                         + (f"  ({note})" if note else ""))
    if "bias_beta_sq" in fits:
        ci = fits.get("bias_beta_sq_ci")
        warn = "  (interval below 0: debiasing overshoots)" if isinstance(ci, list) and ci[1] < 0 else ""
        lines.append(f"  bias of narrower width β² {_num(fits.get('bias_beta_sq'), '.4g')}{_interval(ci)}{warn}")
        if fits.get("bias_exponent") is not None:
            lines.append(f"  bias exponent p {_num(fits['bias_exponent'], '.2f')}"
                         f"{_interval(fits.get('bias_exponent_ci'))}  (theory: 2)")
        elif fits.get("bias_exponent_reason"):
            lines.append(f"  bias exponent: {fits['bias_exponent_reason']}")
    return lines


def summary_from_numbers(run_dir: str | Path) -> dict:
    """The part of the summary.json schema the headline reads, from the report's own numbers
    (fastwidth.report.summary.run_numbers), for a report that wrote no summary.json; no intervals."""
    from fastwidth.report.reader import load_run
    from fastwidth.report.summary import run_numbers
    n = run_numbers(load_run(run_dir))
    widths = [{"width": w, "final_loss": n["probe_loss"].get(w), "true_logit_rmse": n["rmse"].get(w)}
              for w in n["widths"]]
    return {"run": {"reference_width": n["ref_width"]}, "widths": widths,
            "fits": {k: n[k] for k in ("rmse_slope", "variance_slope", "bias_slope")}}


def print_headline(run_dir: str | Path) -> list[str]:
    """Print the headline of a run from its report/summary.json (or, without one, from the
    report's numbers); returns the lines printed."""
    path = RunDir(run_dir).report / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        try:
            summary = summary_from_numbers(run_dir)
        except Exception as e:  # the headline is a courtesy: never fail a finished run for it
            log.info("no headline for %s: %s", run_dir, e)
            return []
    lines = headline_lines(summary if isinstance(summary, dict) else {}, run_dir)
    print("\n".join(lines), flush=True)
    return lines


def report_at_end(run_dir: str | Path) -> Path:
    """The end of a run: its report into RUN/report/, then the headline; returns summary.md."""
    from fastwidth.report.cli import make_report
    t0 = time.time()
    summary_md = make_report([run_dir], RunDir(run_dir).report)
    log.info("report written to %s in %.1f s", RunDir(run_dir).report, time.time() - t0)
    print_headline(run_dir)
    print(f"report: {summary_md}", flush=True)
    return summary_md
