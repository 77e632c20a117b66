"""The bias of narrower widths against the task's complexity (teacher-student sweeps).

    python -m fastwidth.report.complexity RUN... -o OUT      # OUT/complexity.png and OUT/complexity.md

Runs differ in one knob of the synthetic task each (data.teacher_width, data.num_classes,
data.in_dim, data.label_noise); the base is each knob's most common value among the runs. For each
knob one panel draws the debiased bias² b̂² - V_N/S_N - V_ref/S_ref per width at the final
evaluation with its 95% bootstrap interval over seeds (the loop's ensemble rows,
stats/ensemble.py), one line per value of the knob (the base run in every panel). A symmetric-log
axis keeps the values at or below zero, where no bias is detectable, on the figure.
"""
from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

from fastwidth.report.reader import Run, load_run

KNOBS = ("teacher_width", "num_classes", "in_dim", "label_noise")


def knobs(run: Run) -> dict:
    d = run.config.get("data", {})
    return {k: d.get(k, 0.0 if k == "label_noise" else None) for k in KNOBS}


def final_ensemble(run: Run) -> dict[int, dict]:
    step = max((r["step"] for r in run.rows("ensemble")), default=None)
    return {r["width"]: r for r in run.rows("ensemble", step=step)} if step is not None else {}


def groups(runs: list[Run]) -> tuple[dict, dict[str, list[tuple[object, Run]]]]:
    """(base knob values, {knob: [(value, run)]}) with the base run in every knob's list."""
    base = {k: Counter(knobs(r)[k] for r in runs).most_common(1)[0][0] for k in KNOBS}
    out: dict[str, list] = {k: [] for k in KNOBS}
    for run in runs:
        diff = [k for k in KNOBS if knobs(run)[k] != base[k]]
        for k in (KNOBS if not diff else diff if len(diff) == 1 else []):
            out[k].append((knobs(run)[k], run))
    return base, {k: sorted(v, key=lambda p: p[0]) for k, v in out.items() if len(v) > 1}


def complexity_figure(runs: list[Run], path: Path) -> Path | None:
    import matplotlib.pyplot as plt
    from fastwidth.report.figures import _save, _width_ticks
    base, by_knob = groups(runs)
    if not by_knob:
        return None
    fig, axes = plt.subplots(1, len(by_knob), figsize=(4.4 * len(by_knob) + 0.4, 3.8), squeeze=False, sharey=True)
    for ax, (knob, members) in zip(axes[0], by_knob.items()):
        cmap = plt.get_cmap("viridis")
        for i, (value, run) in enumerate(members):
            ens = final_ensemble(run)
            pts = [(w, r["bias_sq_debiased"], r.get("bias_sq_debiased_ci")) for w, r in sorted(ens.items())
                   if r.get("bias_sq_debiased") is not None]
            if not pts:
                continue
            x = [w * (1 + 0.03 * (i - len(members) / 2)) for w, _, _ in pts]
            y = [b for _, b, _ in pts]
            err = [[b - ci[0] if ci else 0 for _, b, ci in pts], [ci[1] - b if ci else 0 for _, b, ci in pts]]
            mark = " (base)" if value == base[knob] else ""
            ax.errorbar(x, y, yerr=err, fmt="-o", ms=4, capsize=3, color=cmap(0.85 * i / max(len(members) - 1, 1)),
                        label=f"{value}{mark}")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=1e-3)
        _width_ticks(ax, [w for _, r in members for w in final_ensemble(r) if w != r.ref_width])
        ax.set_xlabel("width N")
        ax.set_title(f"data.{knob}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, title=knob, title_fontsize=7)
    axes[0][0].set_ylabel("debiased bias² to the reference (95% CI)")
    fig.suptitle("µP: bias of narrower widths against the task's complexity (final evaluation)", fontsize=10)
    return _save(fig, path)


def _cell(v, ci) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.3g}" + (f" [{ci[0]:.2g}, {ci[1]:.2g}]" if ci else "")


def complexity_table(runs: list[Run]) -> list[str]:
    """Markdown: per run (knob = value), the debiased b² per width with its interval, V_N and accuracy."""
    base, by_knob = groups(runs)
    widths = sorted({w for r in runs for w in r.widths if w != r.ref_width})
    lines = ["| knob = value | " + " | ".join(f"b² N={w}" for w in widths) + " | V_N N=" + str(widths[0]) +
             " | probe acc (ref) |", "|---|" + "---|" * (len(widths) + 2)]
    for knob, members in by_knob.items():
        for value, run in members:
            ens = final_ensemble(run)
            acc = [r["probe_acc"] for r in run.rows("eval", step=run.last_step("eval"), width=run.ref_width)
                   if r.get("probe_acc") is not None]
            cells = [_cell(ens.get(w, {}).get("bias_sq_debiased"), ens.get(w, {}).get("bias_sq_debiased_ci"))
                     for w in widths]
            v0 = ens.get(widths[0], {})
            lines.append(f"| {knob} = {value}{' (base)' if value == base[knob] else ''} | " + " | ".join(cells)
                         + f" | {_cell(v0.get('seed_variance'), v0.get('seed_variance_ci'))} | "
                         + (f"{sum(acc) / len(acc):.3f}" if acc else "–") + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("-o", "--output", default="report")
    args = p.parse_args(argv)
    runs = [load_run(r) for r in args.runs]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    fig = complexity_figure(runs, out / "complexity.png")
    (out / "complexity.md").write_text("\n".join(complexity_table(runs)) + "\n")
    print(f"wrote {out / 'complexity.md'}" + (f" and {fig}" if fig else " (no figure: the runs vary no knob)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
