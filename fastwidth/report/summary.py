"""The numbers behind the figures, per run, and summary.md / summary.json.

    nums = run_numbers(run)      # late-time RMSE per width, slopes, variance, loss spread, ...

summary.json (one object; its first run's keys at the top level, every run under "runs"):
    {"run": {"label", "kind", "optimizer", "lr", "data_source", "commit", ...},
     "widths": [{"width", "final_loss", "true_logit_rmse", "true_logit_rmse_ci", "seed_variance",
                 "seed_variance_ci", "bias",
                 "bias_sq_debiased", "bias_sq_debiased_ci", "ensemble_loss", ...}],
     "fits": {"rmse_slope", "rmse_slope_ci", "variance_slope", ..., "bias_slope", ...,
              "ntk": {"step", "kernel", "output", "k", "points", "ref_width", "widths": [{"width",
                      "eigenvalues", "task_power", ..., "same_seed": [{"seed", "cosines", "mean_cos2"}],
                      "same_seed_mean_cos2", "ensemble_cosines", "ensemble_mean_cos2"}],
                      "same_width_baseline": {"seeds", "half_a", "half_b", "halves_mean_cos2",
                      "pairs_mean_cos2", ...}},
              "cka_same_width": {"step", "ref_width", "half_a", "half_b", "halves": {layer: CKA},
                                 "pairs": {layer: CKA}, "n_pairs", "by_step": [...]}},
     "equal_compute": [{"width", "vs_width", "members", "ensemble_loss", "wide_loss", ...}],
     "transfer": {"coarse": {"slope", "ci", "resolution", "below_grid_resolution", "optima", ...},
                  "refined": {...} or null},   (runs with sweep.lrs; report/transfer.py)
     "depth": {"reference_depth", "depths", "widths": [{"width", "depths": [{"depth", "true_logit_rmse",
               "true_logit_rmse_ci", "seed_variance", "seed_variance_ci", "bias", "bias_sq_debiased", ...}],
               "fit": {"rmse_slope", "rmse_slope_ci", ...}}], "transfer": [{"width", "optima", "slope", "ci", ...}]}}
               (runs with sweep.depths; report/depth.py, η* against depth with sweep.lrs)
fits.ntk (when the run stored eNTKs) is the seed-averaged eNTK per width and the principal angles
with the reference width's top eigenspace (report/ntk.py, stats/ntk_across.py); both it and
fits.cka_same_width (report/same_width.py) carry the reference width against its own other seeds,
the baseline a cross-width CKA or cos² is read against ({"note"} instead with fewer than 2 seeds).
The fits are the loop's final `fit` row (stats/ensemble.py: bootstrap intervals over seeds); the
late-time RMSE per width is the mean over the last 25% of tokens, as in the figures.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from fastwidth.report.data_orders import data_order_json, data_order_lines
from fastwidth.report.depth import depth_lines, depth_numbers
from fastwidth.report.intervals import width_intervals
from fastwidth.report.ntk import ntk_across_run, ntk_lines
from fastwidth.report.preact import preact_lines
from fastwidth.report.reader import Run, final_fit, late_mean
from fastwidth.report import sections
from fastwidth.report.same_width import cka_lines, cka_same_width_run
from fastwidth.report.slopes import one_over_n, slope_lines
from fastwidth.report.transfer import depth_fits, transfer_depth_lines, transfer_lines, transfer_summary
from fastwidth.run.metrics import json_safe
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




def equal_compute(ensembles: dict[int, dict]) -> list[dict]:
    """E narrow models against one wider model of about E times the parameters (FLOPs per example
    scale with parameters): L_N(E) measured when E <= S, else from the fit L∞ + c/E (marked)."""
    out = []
    widths = sorted(w for w, r in ensembles.items() if r.get("params") and r.get("ensemble_loss"))
    for i, w in enumerate(widths):
        for v in widths[i + 1:]:
            e = max(1, round(ensembles[v]["params"] / ensembles[w]["params"]))
            curve = ensembles[w]["ensemble_loss"]
            if e <= len(curve):
                loss, how = curve[e - 1], "measured"
            elif ensembles[w].get("ensemble_loss_inf") is not None and ensembles[w].get("ensemble_loss_c") is not None:
                loss, how = ensembles[w]["ensemble_loss_inf"] + ensembles[w]["ensemble_loss_c"] / e, "fit"
            else:
                continue
            out.append({"width": w, "vs_width": v, "members": e, "ensemble_loss": loss, "how": how,
                        "wide_loss": ensembles[v]["ensemble_loss"][0]})
    return out


def _late(run: Run, key: str) -> dict[int, float]:
    return {w: late_mean(p) for w, p in run.series("consistency", key, ref="live").items()}


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
    ensembles = {r["width"]: r for r in ens}
    run_row = (run.rows("run") or [{}])[-1]
    cfg = run.config
    loop = run_row.get("loop")  # trained by another loop (fastwidth.Consistency): config.yaml's optim is not its
    return {
        "optimizer": "user loop" if loop else cfg.get("optim", {}).get("name"),
        "lr": None if loop else cfg.get("optim", {}).get("lr"),
        "data_source": run_row.get("data_source") or cfg.get("data", {}).get("source"), "commit": run_row.get("commit"),
        "arch": cfg.get("model", {}).get("arch"), "wall_s": run_row.get("wall_s"),
        "fit": final_fit(run), "intervals": width_intervals(run), "one_over_n": one_over_n(run),
        "ntk": ntk_across_run(run), "ensembles": ensembles, "equal_compute": equal_compute(ensembles),
        "cka_same_width": cka_same_width_run(run),
        "bias_sq_debiased": {w: r.get("bias_sq_debiased") for w, r in ensembles.items() if w != run.ref_width},
        "loss_gap": _late(run, "loss_gap"), "top1_agreement": _late(run, "top1_agreement"),
        "label": run.label, "kind": run.kind, "widths": run.widths, "ref_width": run.ref_width,
        "seeds": sorted({r["seed"] for r in run.rows("eval")}),
        "tokens": max((r["tokens"] for r in run.all_rows if r.get("kind") in ("train", "eval")), default=0),
        "probe_loss": _final(run, "eval", "probe_loss"), "probe_acc": _final(run, "eval", "probe_acc"),
        "rmse": rmse, "rmse_slope": fit_power_law(list(rmse), list(rmse.values()))[0],
        "rmse_vs_mean": rmse_mean,
        "rmse_vs_mean_slope": fit_power_law(list(rmse_mean), list(rmse_mean.values()))[0],
        "seed_variance": var, "variance_slope": fit_power_law(list(var), list(var.values()))[0],
        "bias": bias, "bias_slope": fit_power_law(list(bias), list(bias.values()))[0],
        "cka": {w: sum(v) / len(v) for w, v in cka.items()},
        "lr_sharpness": _final(run, "sharpness", "lr_sharpness"),
        "loss_spread": spread, "loss_spread_rel": rel, **_compute_numbers(run),
        "transfer": transfer_summary(run),
        "depth": depth_numbers(run), "transfer_depth": [_depth_fit_json(f) for f in depth_fits(run)],
    }


def _depth_fit_json(fit: dict) -> dict:
    keys = ("width", "tokens", "source", "lrs", "optima", "edge", "slope", "ci", "not_identified", "resolution",
            "below_grid_resolution", "local", "seeds", "examples", "resampled")
    return {k: fit[k] for k in keys}


def _compute_numbers(run: Run) -> dict:
    """Model FLOPs per token by width and the median MFU over the logged steps (train rows)."""
    rows = run.rows("train")
    fpt = {r["width"]: r["flops_per_token"] for r in rows if r.get("flops_per_token")}
    mfu = sorted(r["mfu"] for r in rows if isinstance(r.get("mfu"), (int, float)))
    return {"flops_per_token": fpt, "mfu": mfu[len(mfu) // 2] if mfu else None}


def _f(v, fmt=".4g") -> str:
    if isinstance(v, str):
        return v
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _fci(fit: dict, key: str, fmt="+.3f") -> str:
    """A fitted number with its interval: -0.512 [-0.60, -0.43]."""
    ci = fit.get(f"{key}_ci")
    text = _f(fit.get(key), fmt)
    return text if not ci else f"{text} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _table(nums: dict) -> list[str]:
    cols = [("probe loss", nums["probe_loss"]), ("probe acc", nums["probe_acc"]),
            ("late RMSE (same seed)", nums["rmse"]), ("late RMSE (vs ref mean)", nums["rmse_vs_mean"]),
            ("seed variance V_N", nums["seed_variance"]), ("ensemble bias (raw)", nums["bias"]),
            ("debiased bias² [95%]", {w: _square(v, (nums["ensembles"].get(w) or {}).get("bias_sq_debiased_ci"))
                                      for w, v in nums["bias_sq_debiased"].items()}),
            ("L(E = S)", {w: r["ensemble_loss"][-1] for w, r in nums["ensembles"].items() if r.get("ensemble_loss")}),
            ("L∞ (fit) [95%]", {w: _with_ci(r.get("ensemble_loss_inf"), r.get("ensemble_loss_inf_ci"))
                                for w, r in nums["ensembles"].items() if r.get("ensemble_loss")}),
            ("loss gap", nums["loss_gap"]), ("top-1 agreement", nums["top1_agreement"]),
            ("mean CKA", nums["cka"]), ("lr-sharpness", nums["lr_sharpness"]),
            ("model FLOPs/token", nums.get("flops_per_token") or {})]
    cols = [(name, d) for name, d in cols if d]
    out = ["| width | " + " | ".join(n for n, _ in cols) + " |", "|---:|" + "---:|" * len(cols)]
    for w in nums["widths"]:
        out.append(f"| {w}{' (ref)' if w == nums['ref_width'] else ''} | "
                   + " | ".join(_f(d.get(w)) for _, d in cols) + " |")
    return out


NEGATIVE_SQUARE = ("⚠ interval below 0: a square cannot be negative; the seed-variance debiasing "
                   "overshoots here (too few seeds, or V_N mis-estimated)")


def _with_ci(value, ci, fmt=".4g") -> str:
    return _f(value, fmt) + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")


def _square(value, ci, fmt=".4g") -> str:
    """A squared quantity with its interval, flagged where the whole interval lies below 0."""
    text = _f(value, fmt) + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")
    return text + (" ⚠" if ci and ci[1] < 0 else "")


def _fits_table(numbers: list[dict]) -> list[str]:
    out = ["| run | step | RMSE slope | V_N slope | V_N slope (centered) | V_N slope (log p_y) | bias slope (raw) | a | "
           "β² (bias model) | bias exponent p |", "|---|---:|---|---|---|---|---|---|---|---|"]
    warn = []
    for n in numbers:
        f = n["fit"]
        p = _fci(f, "bias_exponent", "+.2f") if f.get("bias_exponent") is not None else \
            (f.get("bias_exponent_reason") or "–").replace("not identified: ", "n/a: ")
        out.append(f"| {n['label']} | {f.get('step', '–')} | " + " | ".join(
            [_fci(f, k) for k in ("rmse_slope", "variance_slope", "variance_slope_centered", "variance_slope_logp",
                                  "bias_slope")]
            + [_fci(f, "rmse2_a", ".4g"), _square(f.get("bias_beta_sq"), f.get("bias_beta_sq_ci")), p]) + " |")
        if (f.get("bias_beta_sq_ci") or [0, 0])[1] < 0:
            warn.append(f"- {n['label']}: β² {NEGATIVE_SQUARE}.")
    return out + ([""] + warn if warn else [])


FITS_TEXT = ("Slopes are least-squares fits of log(value) on log(width): true-logit RMSE against the "
             "reference-width model (the paper's is about -0.5 late in training), seed variance V_N of the "
             "true logit (1/N gives -1), the same of the centered true logit z_y - mean_c z_c and of log p_y (both "
             "free of a per-seed shift of every logit; report/outputs.py) and the raw ensemble bias ||f̄_N - f̄_ref|| (which holds V_N/S_N + "
             "V_ref/S_ref of seed noise, so its slope follows V_N's). The bias model RMSE² = a(1/N + 1/N_ref) + "
             "β²(1/N - 1/N_ref)² (fastwidth/stats/bias_model.py): a is the variance term; β² is fitted on the "
             "debiased b̂²(N) (the variance measured per width, not modelled), so the bias of width N is "
             "β|1/N - 1/N_ref|; p is the exponent of b̂² ∝ (1/N - 1/N_ref)^p (theory: 2), reported only where "
             "β²'s interval excludes 0. Intervals: basic bootstrap over seeds, widened for few seeds "
             "(docs/calibration.md gives their measured coverage). Late RMSE slope: of the mean over the last 25% "
             "of tokens. Loss spread: mean over evals of the max-min across widths of the probe loss (seed means).")


def _equal_compute_table(n: dict) -> list[str]:
    if not n["equal_compute"]:
        return []
    out = ["E narrow models against one wide model of about E times the parameters (averaged logits):", "",
           "| narrow N | E | ensemble loss | wide N | wide loss (one model) |", "|---:|---:|---:|---:|---:|"]
    for r in n["equal_compute"]:
        mark = "" if r["how"] == "measured" else " (fit L∞ + c/E)"
        out.append(f"| {r['width']} | {r['members']} | {_f(r['ensemble_loss'])}{mark} | {r['vs_width']} | {_f(r['wide_loss'])} |")
    return out + [""]


def write_summary(runs: list[Run], figures: dict[str, Path | None], out: Path, notes: list[str] = ()) -> Path:
    """summary.md and summary.json in `out`; `notes`: paragraphs for the top (comparisons skipped)."""
    numbers = [run_numbers(run) for run in runs]
    lines = ["# fastwidth report", ""] + [f"{note}\n" for note in notes]
    lines += [f"**Partial run** {run.label}: {run.partial}; the figures draw what is there.\n"
              for run in runs if run.partial]
    lines += [f"**History from step {r['step']}** {run.label}: its metrics.jsonl was lost before a resume; the rows "
              f"and figures start at that checkpoint.\n" for run in runs for r in run.rows("history_lost")[:1]]
    lines += ["| run | kind | optimizer, LR | data | widths | seeds | tokens | late RMSE slope | loss spread (rel.) |",
              "|---|---|---|---|---|---|---:|---:|---:|"]
    for n in numbers:
        lines.append(f"| {n['label']} | {n['kind']} | {n['optimizer']}, {n['lr']} | {n['data_source']} | {n['widths']} | "
                     f"{n['seeds']} | {n['tokens']} | {_f(n['rmse_slope'], '+.3f')} | "
                     f"{_f(n['loss_spread'], '.4f')} ({_f(n['loss_spread_rel'], '.2%')}) |")
    lines += ["", "Fits at the final evaluation, with 95% bootstrap intervals over seeds (none with fewer "
              "than 3 seeds per width):", ""] + _fits_table(numbers)
    lines += ["", FITS_TEXT, ""]
    lines += transfer_lines(runs) + transfer_depth_lines(runs) + slope_lines(runs) + data_order_lines(runs)
    lines += depth_lines(runs) + sections.summary_lines(runs)
    for run, n in zip(runs, numbers):
        lines += [f"## {n['label']}", "", f"commit {n['commit'] or 'unknown'}", ""]
        if n.get("mfu") is not None:
            lines += [f"MFU {n['mfu']:.2%} (median over the logged steps: every member's model FLOPs per "
                      "token times tokens/s, over the devices' peak; fastwidth/trainer/flops.py)", ""]
        lines += _table(n) + [""]
        lines += _equal_compute_table(n)
        lines += cka_lines(run) + ntk_lines(run)
        lines += preact_lines([run])
    lines += ["## Figures", ""]
    for name, path in figures.items():
        lines.append(f"![{name}]({name})" if path else f"- {name}: not drawn (the runs hold no rows for it)")
    lines.append("")
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    write_summary_json(numbers, out / "summary.json", data_order_json(runs), sections.summary_json(runs))
    return path


def _json_run(n: dict) -> dict:
    ens = n["ensembles"]
    widths = []
    for w in n["widths"]:
        e, iv = ens.get(w, {}), n["intervals"].get(w, {})
        widths.append({"width": w, "reference": w == n["ref_width"], "final_loss": n["probe_loss"].get(w),
                       "probe_acc": n["probe_acc"].get(w), "true_logit_rmse": n["rmse"].get(w),
                       "true_logit_rmse_ci": iv.get("true_logit_rmse_ci"),
                       "seed_variance": e.get("seed_variance"), "seed_variance_ci": iv.get("seed_variance_ci"), "bias": e.get("bias"),
                       "bias_sq_debiased": e.get("bias_sq_debiased"), "bias_sq_debiased_ci": e.get("bias_sq_debiased_ci"),
                       "ensemble_loss": e.get("ensemble_loss"), "ensemble_acc": e.get("ensemble_acc"),
                       "ensemble_loss_inf": e.get("ensemble_loss_inf"), "ensemble_loss_inf_ci": e.get("ensemble_loss_inf_ci"),
                       "ensemble_loss_c": e.get("ensemble_loss_c"),
                       "params": e.get("params"), "loss_gap": n["loss_gap"].get(w),
                       "top1_agreement": n["top1_agreement"].get(w), "cka": n["cka"].get(w),
                       "flops_per_token": (n.get("flops_per_token") or {}).get(w)})
    run = {k: n[k] for k in ("label", "kind", "arch", "optimizer", "lr", "data_source", "commit", "ref_width",
                             "seeds", "tokens", "wall_s")}
    run["mfu"] = n.get("mfu")
    fits = dict(n["fit"], late_rmse_slope=n["rmse_slope"], loss_spread=n["loss_spread"],
                loss_spread_rel=n["loss_spread_rel"])
    if n["ntk"]:
        fits["ntk"] = n["ntk"]
    if n["cka_same_width"]:
        fits["cka_same_width"] = n["cka_same_width"]
    if n["one_over_n"]:
        fits["variance_one_over_n"] = n["one_over_n"]
    out = {"run": run, "widths": widths, "fits": fits, "equal_compute": n["equal_compute"]}
    if n["transfer"]:  # sweep.lrs: the drift on the coarse and (sweep.lr_refine) the refined grid
        out["transfer"] = n["transfer"]
    if n["depth"]:  # sweep.depths: per width, per depth against the reference depth, and the fits
        out["depth"] = {**n["depth"], "transfer": n["transfer_depth"]}
    return out


def write_summary_json(numbers: list[dict], path: Path, data_orders: list[dict] | None = None,
                       paper: dict | None = None) -> Path:
    """summary.json: every fitted number with its interval and the run's settings (module docstring);
    `data_orders` (report/data_orders.py) where the report was given runs differing only in data.seed;
    `paper` (report/sections.py) the numbers of the paper's figure types the runs hold."""
    runs = [_json_run(n) for n in numbers]
    doc = {**(runs[0] if runs else {"run": {}, "widths": [], "fits": {}}), "runs": runs}
    if data_orders:
        doc["data_orders"] = data_orders
    if paper:
        doc["paper"] = paper
    path.write_text(json.dumps(json_safe(doc), indent=1, allow_nan=False) + "\n")
    return path
