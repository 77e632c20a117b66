"""The numbers behind the figures, per run, and summary.md.

    nums = run_numbers(run)      # late-time RMSE per width, slopes, variance, loss spread, ...
"""
from __future__ import annotations

import math
from pathlib import Path

from fastwidth.report.reader import Run, late_mean
from fastwidth.report.transfer import transfer_lines
from fastwidth.stats.metrics import fit_power_law


def _final(run: Run, kind: str, key: str, **match) -> dict[int, float]:
    return {w: pts[-1][1] for w, pts in run.series(kind, key, **match).items() if pts}


def loss_spread(run: Run) -> tuple[float, float]:
    """Mean over evals (after step 0) of the max-min across widths of the seed-mean probe loss,
    absolute and relative to the mean loss: how far apart the loss curves of different widths are."""
    series = run.series("eval", "probe_loss")
    by_t: dict[int, list[float]] = {}
    for pts in series.values():
        for t, v in pts:
            if t > 0:
                by_t.setdefault(t, []).append(v)
    gaps = [(max(v) - min(v), (max(v) - min(v)) / (sum(v) / len(v))) for v in by_t.values() if len(v) == len(series)]
    if not gaps:
        return math.nan, math.nan
    return sum(g for g, _ in gaps) / len(gaps), sum(r for _, r in gaps) / len(gaps)


def run_numbers(run: Run) -> dict:
    rmse = {w: late_mean(p) for w, p in run.series("consistency", "true_logit_rmse", ref="live").items()}
    rmse_mean = {w: late_mean(p) for w, p in run.series("consistency", "true_logit_rmse_vs_mean", ref="live").items()}
    ens_step = max((r["step"] for r in run.rows("ensemble")), default=None)
    ens = run.rows("ensemble", step=ens_step) if ens_step is not None else []
    var = {r["width"]: r["seed_variance"] for r in ens if r.get("seed_variance")}
    bias = {r["width"]: r["bias"] for r in ens if r.get("bias") and r["width"] != run.ref_width}
    cka = {}
    last = max((r["step"] for r in run.rows("consistency", ref="live")), default=None)
    for r in run.rows("consistency", ref="live", step=last) if last is not None else []:
        vals = [v for v in (r.get("cka") or {}).values() if v is not None]
        if vals:
            cka.setdefault(r["width"], []).append(sum(vals) / len(vals))
    spread, rel = loss_spread(run)
    return {
        "label": run.label, "kind": run.kind, "widths": run.widths, "ref_width": run.ref_width,
        "seeds": sorted({r["seed"] for r in run.rows("eval")}),
        "tokens": max((r["tokens"] for r in run.all_rows if "tokens" in r), default=0),
        "probe_loss": _final(run, "eval", "probe_loss"), "probe_acc": _final(run, "eval", "probe_acc"),
        "rmse": rmse, "rmse_slope": fit_power_law(list(rmse), list(rmse.values()))[0],
        "rmse_vs_mean": rmse_mean,
        "rmse_vs_mean_slope": fit_power_law(list(rmse_mean), list(rmse_mean.values()))[0],
        "seed_variance": var, "variance_slope": fit_power_law(list(var), list(var.values()))[0],
        "bias": bias, "bias_slope": fit_power_law(list(bias), list(bias.values()))[0],
        "cka": {w: sum(v) / len(v) for w, v in cka.items()},
        "lr_sharpness": _final(run, "sharpness", "lr_sharpness"),
        "loss_spread": spread, "loss_spread_rel": rel,
    }


def _f(v, fmt=".4g") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _table(nums: dict) -> list[str]:
    cols = [("probe loss", nums["probe_loss"]), ("probe acc", nums["probe_acc"]),
            ("late RMSE (same seed)", nums["rmse"]), ("late RMSE (vs ref mean)", nums["rmse_vs_mean"]),
            ("seed variance V_N", nums["seed_variance"]), ("ensemble bias", nums["bias"]),
            ("mean CKA", nums["cka"]), ("lr-sharpness", nums["lr_sharpness"])]
    cols = [(name, d) for name, d in cols if d]
    out = ["| width | " + " | ".join(n for n, _ in cols) + " |", "|---:|" + "---:|" * len(cols)]
    for w in nums["widths"]:
        out.append(f"| {w}{' (ref)' if w == nums['ref_width'] else ''} | "
                   + " | ".join(_f(d.get(w)) for _, d in cols) + " |")
    return out


def write_summary(runs: list[Run], figures: dict[str, Path | None], out: Path) -> Path:
    numbers = [run_numbers(run) for run in runs]
    lines = ["# fastwidth report", ""]
    lines += ["| run | kind | widths | seeds | tokens | RMSE slope | V_N slope | bias slope | loss spread (rel.) |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for n in numbers:
        lines.append(f"| {n['label']} | {n['kind']} | {n['widths']} | {n['seeds']} | {n['tokens']} | "
                     f"{_f(n['rmse_slope'], '+.3f')} | {_f(n['variance_slope'], '+.3f')} | "
                     f"{_f(n['bias_slope'], '+.3f')} | {_f(n['loss_spread'], '.4f')} ({_f(n['loss_spread_rel'], '.2%')}) |")
    lines += ["", "Slopes are least-squares fits of log(value) on log(width): late-time true-logit RMSE against "
              "the reference-width model of the same seed (mean over seeds and over the last 25% of tokens; "
              "the paper's is about -0.5), seed variance V_N of the true logit at the final eval (1/N gives -1) "
              "and the ensemble bias ||f̄_N - f̄_ref||. Loss spread: mean over evals of the max-min across widths "
              "of the probe loss (seed means).", ""]
    lines += transfer_lines(runs)
    for n in numbers:
        lines += [f"## {n['label']}", ""] + _table(n) + [""]
    lines += ["## Figures", ""]
    for name, path in figures.items():
        lines.append(f"![{name}]({name})" if path else f"- {name}: not drawn (the runs hold no rows for it)")
    lines.append("")
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path
