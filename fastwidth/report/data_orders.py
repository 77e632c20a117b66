"""A bias is a bias only where it survives another data order.

    pairs = data_order_groups(runs)      # runs that differ only in data.seed (and their out_dir)
    lines = data_order_lines(runs)       # summary.md: per width the debiased b² of each order

The debiased b² of one run is a statement about that run's seeds on that run's data stream: its
interval is over seeds only, so a data order that happens to favour one width looks like a bias.
Two runs identical but for `data.seed` (the order of the online stream, independent of the init
seeds) each give per-width b² with intervals; a width's bias is "confirmed" when every order's
interval lies above 0, "not confirmed" when only some do, and "none detected" when none does.
With one data order the verdict is "one data order" (not confirmed).
"""
from __future__ import annotations

import copy
import json

from fastwidth.report.reader import Run

IGNORED = (("train", "out_dir"), ("train", "resume"), ("train", "threads"), ("data", "seed"))


def _identity(run: Run) -> str:
    cfg = copy.deepcopy(run.config)
    for section, key in IGNORED:
        (cfg.get(section) or {}).pop(key, None)
    cfg["probe"] = run.probe  # runs on different probe splits are never compared (report/cli.py)
    return json.dumps(cfg, sort_keys=True, default=str)


def data_order_groups(runs: list[Run]) -> list[list[Run]]:
    """Groups of >= 2 runs whose configs agree except in data.seed (and paths), by distinct data.seed."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(_identity(run), []).append(run)
    out = []
    for group in groups.values():
        seeds = {(r.config.get("data") or {}).get("seed", 0) for r in group}
        if len(seeds) >= 2:
            out.append(sorted(group, key=lambda r: (r.config.get("data") or {}).get("seed", 0)))
    return out


def final_biases(run: Run) -> dict[int, tuple[float, list | None]]:
    """{width: (bias_sq_debiased, its interval)} of the run's final ensemble rows."""
    step = max((r["step"] for r in run.rows("ensemble")), default=None)
    if step is None:
        return {}
    return {r["width"]: (r["bias_sq_debiased"], r.get("bias_sq_debiased_ci")) for r in run.rows("ensemble", step=step)
            if r.get("bias_sq_debiased") is not None and r["width"] != run.ref_width}


def verdict(cis: list[list | None]) -> str:
    above = [ci is not None and ci[0] > 0 for ci in cis]
    if len(cis) < 2:
        return "one data order" + (": bias in this order, not confirmed" if any(above) else "")
    if all(above):
        return "bias (confirmed in every data order)"
    if any(above):
        return "not confirmed (above 0 in one order only)"
    return "none detected"


def _fmt(v: float, ci: list | None) -> str:
    text = f"{v:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")
    return text + (" ⚠ below 0" if ci and ci[1] < 0 else "")


def data_order_lines(runs: list[Run]) -> list[str]:
    """summary.md: one table per group of runs that differ only in their data order."""
    lines = []
    for group in data_order_groups(runs):
        per = [final_biases(r) for r in group]
        widths = sorted(set.intersection(*(set(p) for p in per)))
        if not widths:
            continue
        head = " | ".join(f"b² data.seed={(r.config.get('data') or {}).get('seed', 0)}" for r in group)
        lines += [f"## Bias across data orders ({', '.join(r.label for r in group)})", "",
                  "Debiased b² = b̂² - V_N/S_N - V_ref/S_ref at the final evaluation, 95% intervals over seeds, "
                  "in runs that differ only in the order of the online stream:", "",
                  f"| width | {head} | verdict |", "|---:|" + "---|" * (len(group) + 1)]
        for w in widths:
            cells = " | ".join(_fmt(*p[w]) for p in per)
            lines.append(f"| {w} | {cells} | {verdict([p[w][1] for p in per])} |")
        lines.append("")
    return lines


def data_order_json(runs: list[Run]) -> list[dict]:
    """summary.json "data_orders": per group, per width each order's b² with its interval and the verdict."""
    out = []
    for group in data_order_groups(runs):
        per = [final_biases(r) for r in group]
        widths = sorted(set.intersection(*(set(p) for p in per))) if per else []
        out.append({"runs": [r.label for r in group],
                    "widths": [{"width": w, "verdict": verdict([p[w][1] for p in per]),
                                "orders": [{"data_seed": (r.config.get("data") or {}).get("seed", 0),
                                            "bias_sq_debiased": p[w][0], "bias_sq_debiased_ci": p[w][1]}
                                           for r, p in zip(group, per)]} for w in widths]})
    return out
