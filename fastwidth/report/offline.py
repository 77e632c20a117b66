"""Offline against online training (data.train_size): per width the training-subset loss beside the probe loss, and the consistency statistics of runs side by side (fastwidth report RUN_A RUN_B).

The section's protocol (report/sections.py): FIGURES {file name: draw(runs, path) -> path or
None}, summary_lines(runs) -> summary.md lines, summary_json(runs) -> summary.json's
"paper"["offline"] (empty when the runs hold nothing for it). It applies when a run given has
data.train_size > 0 (its eval rows carry train_subset_loss); every run given is shown, an online
one (train_size 0) with its probe loss only.

The numbers are the report's own: V_N per width and its interval from intervals.width_intervals,
debiased b² and its interval from the loop's final ensemble rows (intervals.final_ensemble), the
V_N slope and its interval from the final fit row (reader.final_fit). The ratio
b²_offline / b²_online per width resamples seeds independently within each run (the estimator's
own bootstrap replicates, SeedEnsembles.replicates, rebuilt from the final signatures) and is a
basic bootstrap interval; it is "not identified" where the online b² interval reaches 0 or below.
"""
from __future__ import annotations

import math

import numpy as np

from fastwidth.report.intervals import N_BOOT, final_ensemble, signature_ensembles, width_intervals
from fastwidth.report.reader import Run, final_fit
from fastwidth.stats.ensemble import basic_ci, expansion


def train_size(run: Run) -> int:
    return int((run.config.get("data") or {}).get("train_size") or 0)


def run_name(run: Run) -> str:
    k = train_size(run)
    return f"{run.label}, train_size={k}" if k else f"{run.label}, whole split"


def _applies(runs: list[Run]) -> bool:
    return any(train_size(r) and r.rows("eval") for r in runs)


def _final(run: Run, key: str) -> dict[int, float]:
    return {w: pts[-1][1] for w, pts in run.series("eval", key).items() if pts}


def run_numbers(run: Run) -> dict:
    """Per width: final probe loss, train-subset loss and their gap (seed means), V_N and debiased
    b² with intervals; the V_N slope with its interval."""

    probe, subset = _final(run, "probe_loss"), _final(run, "train_subset_loss")
    iv = width_intervals(run)
    _, ens = final_ensemble(run)
    fit = final_fit(run)
    widths = []
    for w in run.widths:
        e, i = ens.get(w, {}), iv.get(w, {})
        sub = subset.get(w)
        widths.append({"width": w, "reference": w == run.ref_width, "probe_loss": probe.get(w),
                       "train_subset_loss": sub, "gap": None if sub is None or w not in probe else probe[w] - sub,
                       "seed_variance": i.get("seed_variance"), "seed_variance_ci": i.get("seed_variance_ci"),
                       "bias_sq_debiased": e.get("bias_sq_debiased"), "bias_sq_debiased_ci": e.get("bias_sq_debiased_ci")})
    seeds = sorted({r["seed"] for r in run.rows("eval")})
    return {"label": run.label, "train_size": train_size(run), "seeds": seeds, "ref_width": run.ref_width,
            "variance_slope": fit.get("variance_slope"), "variance_slope_ci": fit.get("variance_slope_ci"),
            "widths": widths}


def pair(runs: list[Run]) -> tuple[Run, Run] | None:
    """(offline, online): the run of the smallest train_size > 0 against an online run (train_size
    0) or else the one of the largest train_size; None with fewer than two such runs."""
    off = sorted((r for r in runs if train_size(r)), key=train_size)
    if not off:
        return None
    others = [r for r in runs if r is not off[0]]
    online = [r for r in others if not train_size(r)] or sorted(
        (r for r in others if train_size(r) > train_size(off[0])), key=train_size, reverse=True)
    return (off[0], online[0]) if online else None


def bias_ratio(offline: Run, online: Run, n_boot: int = N_BOOT, seed: int = 0) -> list[dict]:
    """Per compared width, offline against online, with basic bootstrap intervals over seeds
    resampled independently within each run:
    - ratio = b²_offline / b²_online, {"not_identified": reason} where the online b² interval reaches
      0 or below (µP online has no detectable bias at CPU scale: the ratio's denominator is 0);
    - difference = b²_offline − b²_online (identified whenever both runs have a bootstrap);
    - rmse_ratio = true-logit RMSE to the reference, offline over online (the disagreement across
      widths, variance and bias together)."""
    _, ens_on = final_ensemble(online)
    step_off, step_on = final_ensemble(offline)[0], final_ensemble(online)[0]
    est = [signature_ensembles(r, s) if s is not None else None for r, s in ((offline, step_off), (online, step_on))]
    reps = {key: [e.replicates(key, n_boot, seed + i) if e is not None else {} for i, e in enumerate(est)]
            for key in ("bias_sq_debiased", "rmse")}
    n = [len({r["seed"] for r in run.rows("eval")}) for run in (offline, online)]
    out = []
    widths = sorted(set(offline.widths) & set(online.widths) - {offline.ref_width, online.ref_width})
    for w in widths:
        row = {"width": w}
        b2 = reps["bias_sq_debiased"]
        if w not in b2[0] or w not in b2[1]:
            row["not_identified"] = "no bootstrap (fewer than 4 seeds with final signatures in a run)"
            out.append(row)
            continue
        (o_off, b_off, p_off), (o_on, b_on, p_on) = b2[0][w], b2[1][w]
        row.update(difference=o_off - o_on, difference_ci=basic_ci(o_off - o_on, b_off - b_on, p_off - p_on,
                                                                   expand=expansion(n)))
        ci_on = ens_on.get(w, {}).get("bias_sq_debiased_ci")
        if ci_on is None or ci_on[0] <= 0:
            row["not_identified"] = f"the online b² interval {_ci(ci_on)} reaches 0 or below"
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                samples = b_off / b_on
            row.update(ratio=o_off / o_on, ratio_ci=basic_ci(o_off / o_on, samples, p_off / p_on, expand=expansion(n)))
        rm = reps["rmse"]
        if w in rm[0] and w in rm[1] and rm[1][w][0] > 0:
            (r_off, s_off, q_off), (r_on, s_on, q_on) = rm[0][w], rm[1][w]
            with np.errstate(divide="ignore", invalid="ignore"):
                rs = s_off / s_on
            row.update(rmse_ratio=r_off / r_on, rmse_ratio_ci=basic_ci(r_off / r_on, rs, q_off / q_on,
                                                                       expand=expansion(n)))
        out.append(row)
    return out


# --------------------------------------------------------------------------- figure

def draw(runs: list[Run], path):
    if not _applies(runs):
        return None
    from fastwidth.report._plotbase import _loglog_axes, _save, _tokens_axis, plt, width_colors

    nums = [run_numbers(r) for r in runs]
    widths = sorted({w for r in runs for w in r.widths})
    colors = width_colors(widths)
    cols = max(len(runs), 2)
    fig, axes = plt.subplots(2, cols, figsize=(5.2 * cols + 0.6, 8.0), squeeze=False)
    for ax, run, n in zip(axes[0], runs, nums):
        for w in run.widths:
            probe = [p for p in run.series("eval", "probe_loss").get(w, []) if p[0] > 0]   # a log axis
            sub = [p for p in run.series("eval", "train_subset_loss").get(w, []) if p[0] > 0]
            ax.plot(*zip(*probe), "--", color=colors[w], label=f"N={w} probe") if probe else None
            ax.plot(*zip(*sub), "-", color=colors[w], label=f"N={w} train subset") if sub else None
        _tokens_axis(ax, run)
        ax.set_ylabel("cross-entropy loss (nats)")
        ax.set_title(f"{run_name(run)}, {len(n['seeds'])} seeds (seed mean)", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    for ax in axes[0][len(runs):]:
        ax.axis("off")
    markers = "osD^v"
    ax_v, ax_b = axes[1][0], axes[1][1]
    for k, (run, n) in enumerate(zip(runs, nums)):
        pts = [(r["width"], r["seed_variance"], r["seed_variance_ci"]) for r in n["widths"] if r["seed_variance"]]
        if pts:
            ws, v, ci = zip(*pts)
            err = _errbars(v, ci)
            slope = n["variance_slope"]
            lab = f"{run_name(run)}: slope {_fmt(slope, '+.2f')} {_ci(n['variance_slope_ci'], '+.2f')}"
            line = ax_v.errorbar(ws, v, yerr=err, fmt=markers[k % 5], capsize=3, label=lab)
            if slope is not None and math.isfinite(slope):
                x = np.array([min(ws), max(ws)], dtype=float)
                c = np.mean(np.log(v)) - slope * np.mean(np.log(ws))
                ax_v.plot(x, np.exp(c) * x ** slope, "-", color=line[0].get_color(), alpha=0.6)
        pts = [(r["width"], r["bias_sq_debiased"], r["bias_sq_debiased_ci"]) for r in n["widths"]
               if r["bias_sq_debiased"] is not None]
        if pts:
            ws, b, ci = zip(*pts)
            shift = 2 ** (0.06 * (k - (len(runs) - 1) / 2))   # side by side at each width
            ax_b.errorbar([w * shift for w in ws], b, yerr=_errbars(b, ci), fmt=markers[k % 5], capsize=3,
                          label=run_name(run))
    _loglog_axes(ax_v, widths)
    ax_v.set_ylabel("seed variance V_N of the true logit")
    ax_v.set_title("V_N against width, fitted slope [95% bootstrap over seeds]", fontsize=9)
    ax_v.legend(fontsize=7)
    ax_b.set_xscale("log", base=2)
    ax_b.set_xticks(widths, [str(w) for w in widths])
    ax_b.axhline(0, color="grey", lw=0.8)
    ax_b.set_xlabel("width N")
    ax_b.set_ylabel("debiased bias² b² vs the reference width")
    ax_b.set_title("per-width b² [95% bootstrap over seeds]", fontsize=9)
    ax_b.grid(True, alpha=0.3)
    ax_b.legend(fontsize=7)
    for ax in axes[1][2:]:
        ax.axis("off")
    return _save(fig, path)


def _errbars(values, cis):
    lo = [v - c[0] if c else 0.0 for v, c in zip(values, cis)]
    hi = [c[1] - v if c else 0.0 for v, c in zip(values, cis)]
    return np.maximum([lo, hi], 0.0)


FIGURES = {"offline.png": draw}


# --------------------------------------------------------------------------- summary

def _fmt(v, fmt=".4g") -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, fmt)


def _ci(ci, fmt=".3g") -> str:
    return "[no interval]" if not ci else f"[{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def summary_lines(runs: list[Run]) -> list[str]:
    if not _applies(runs):
        return []
    out = ["## Offline against online", "",
           "Per width and run at the final evaluation: the seed-mean probe loss, the loss on the training "
           "subset's first min(K, data.probe_size) examples and their gap, the seed variance V_N of the "
           "true logit and the debiased b² against the reference width, with 95% bootstrap intervals over seeds.",
           "", "| run | width | probe loss | train-subset loss | gap | V_N | b² (debiased) |", "|---|---|---|---|---|---|---|"]
    nums = [run_numbers(r) for r in runs]
    for run, n in zip(runs, nums):
        for r in n["widths"]:
            b2 = "reference" if r["reference"] else f"{_fmt(r['bias_sq_debiased'])} {_ci(r['bias_sq_debiased_ci'])}"
            out.append(f"| {run_name(run)} | {r['width']} | {_fmt(r['probe_loss'])} | {_fmt(r['train_subset_loss'])} | "
                       f"{_fmt(r['gap'], '+.4f')} | {_fmt(r['seed_variance'])} {_ci(r['seed_variance_ci'])} | {b2} |")
    out += [""] + [f"- {run_name(run)}: V_N slope {_fmt(n['variance_slope'], '+.3f')} {_ci(n['variance_slope_ci'], '+.3f')} "
                   f"({len(n['seeds'])} seeds)" for run, n in zip(runs, nums)]
    pr = pair(runs)
    if pr:
        out += ["", f"{run_name(pr[0])} against {run_name(pr[1])} (95% bootstrap, seeds resampled independently "
                    "within each run): the bias ratio b²_offline / b²_online, the difference b²_offline − b²_online "
                    "and the ratio of the true-logit RMSE to the reference (variance and bias together):", "",
                "| width | b² ratio | b² difference | RMSE ratio |", "|---|---|---|---|"]
        for r in bias_ratio(*pr):
            ratio = f"not identified: {r['not_identified']}" if "ratio" not in r else \
                f"{_fmt(r['ratio'], '.3g')} {_ci(r['ratio_ci'])}"
            diff = f"{_fmt(r['difference'], '+.3g')} {_ci(r['difference_ci'])}" if "difference" in r else "–"
            rmse = f"{_fmt(r['rmse_ratio'], '.3g')} {_ci(r['rmse_ratio_ci'])}" if "rmse_ratio" in r else "–"
            out.append(f"| {r['width']} | {ratio} | {diff} | {rmse} |")
    return out + [""]


def summary_json(runs: list[Run]) -> dict:
    if not _applies(runs):
        return {}
    out = {"runs": [run_numbers(r) for r in runs]}
    pr = pair(runs)
    if pr:
        out["bias_ratio"] = {"offline": pr[0].label, "online": pr[1].label, "widths": bias_ratio(*pr)}
    return out
