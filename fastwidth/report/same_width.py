"""The CKA of the reference width against itself (other seeds), read from the feature kernels Φ the
run stored in its signatures, beside the cross-width CKA rows. The math is stats/same_width.py.

    base = cka_same_width_run(run)     # None without kernels; else stats' dict + "step", "ref_width", "by_step"
    step, table = cka_by_layer(run)    # the cross-width rows: {layer: {width: mean over seeds}}
    lines = cka_lines(run)             # summary.md: per-layer table with the "other seeds" rows
"""
from __future__ import annotations

from fastwidth.report.reader import Run
from fastwidth.stats.same_width import cka_same_width

_CACHE: dict[tuple, dict | None] = {}

LABEL = "same width, other seeds"


def cka_by_layer(run: Run) -> tuple[int | None, dict[str, dict[int, float]]]:
    """(final consistency step, {layer: {width: mean over seeds of the CKA with the same-seed
    reference-width model}}) from the live consistency rows."""
    step = max((r["step"] for r in run.rows("consistency", ref="live")), default=None)
    rows = run.rows("consistency", ref="live", step=step) if step is not None else []
    table: dict[str, dict[int, float]] = {}
    for layer in sorted({l for r in rows for l in (r.get("cka") or {})}):
        for w in sorted({r["width"] for r in rows}):
            vals = [r["cka"][layer] for r in rows if r["width"] == w and (r.get("cka") or {}).get(layer) is not None]
            if vals:
                table.setdefault(layer, {})[w] = sum(vals) / len(vals)
    return step, table


def _ref_kernels(run: Run) -> dict[int, dict[int, dict]]:
    """{step: {seed: {layer: Φ}}} of the reference width's kept members (not diverged; the chosen
    LR of an LR sweep), at the steps where every kept seed stored kernels."""
    ref = run.ref_width
    seeds = sorted({r["seed"] for r in run.rows("eval", width=ref)})
    names = {s: run.member_name(ref, s) for s in seeds}
    steps = [set(run.signatures.get(n, {})) for n in names.values()]
    out = {}
    for step in sorted(set.intersection(*steps)) if steps else []:
        per_seed = {}
        for s, n in names.items():
            sig = run.signature(n, step)[0]
            per_seed[s] = {k.split("/", 1)[1]: v for k, v in sig.items() if k.startswith("kernel/")}
        if all(per_seed.values()):
            out[step] = per_seed
    return out


def cka_same_width_run(run: Run) -> dict | None:
    """The reference width's same-width CKA baseline at every evaluation that stored kernels.

    Returns stats.same_width.cka_same_width's dict at the final such step, plus "step",
    "ref_width" and "by_step": [{"step", "halves", "pairs"}]; None when the run stored no kernels
    at the reference width. With fewer than 2 seeds the dict carries "note" instead of numbers.
    """
    key = (str(run.path), run.ref_width, run.chosen_lr, len(run.all_rows))
    if key not in _CACHE:
        kernels = _ref_kernels(run)
        if not kernels:
            _CACHE[key] = None
            return None
        by_step = {step: cka_same_width(k) for step, k in kernels.items()}
        last = max(by_step)
        out = dict(by_step[last], step=last, ref_width=run.ref_width)
        if "note" not in out:
            out["by_step"] = [{"step": s, "halves": d["halves"], "pairs": d["pairs"]} for s, d in by_step.items()]
        _CACHE[key] = out
    return _CACHE[key]


def baseline_at(base: dict, step: int | None) -> dict:
    """{"step", "halves", "pairs"} of the baseline at `step` (the cross-width rows' step), else at
    its final step."""
    return next((d for d in base["by_step"] if d["step"] == step), base["by_step"][-1])


def cka_lines(run: Run) -> list[str]:
    """summary.md: CKA with the reference width per layer, and the reference width's own seeds."""
    base = cka_same_width_run(run)
    step, table = cka_by_layer(run)
    if not table and not base:
        return []
    layers = sorted(set(table) | set((base or {}).get("pairs", {})))
    f = lambda v: "–" if v is None else f"{v:.4f}"   # noqa: E731
    out = [f"CKA of the feature kernels Φ per layer at step {step}: width N seed s against the N={run.ref_width} "
           f"model of seed s (mean over seeds), and the reference width against its own other seeds ({LABEL}): "
           "seed pairs (like for like) and the mean kernels of two disjoint halves of the seeds:", "",
           "| width | " + " | ".join(layers) + " |", "|---|" + "---:|" * len(layers)]
    for w in sorted({w for d in table.values() for w in d}):
        out.append(f"| {w} | " + " | ".join(f(table.get(l, {}).get(w)) for l in layers) + " |")
    if base and "note" in base:
        out.append(f"| {run.ref_width} (ref), other seeds | " + " | ".join("–" for _ in layers) + " |")
        return out + ["", f"Same-width baseline: none ({base['note']}).", ""]
    if base:
        at = baseline_at(base, step)
        pairs = f"{base['n_pairs']} seed pair{'s' if base['n_pairs'] != 1 else ''}"
        halves = f"seeds {base['half_a']} vs {base['half_b']}"
        out += [f"| {run.ref_width} (ref), other seeds: {pairs} | "
                + " | ".join(f(at["pairs"].get(l)) for l in layers) + " |",
                f"| {run.ref_width} (ref), other seeds: mean Φ of {halves} | "
                + " | ".join(f(at["halves"].get(l)) for l in layers) + " |"]
        if at["step"] != step:
            out += ["", f"(the same-width rows are from step {at['step']}, the last with stored kernels)"]
    return out + [""]
