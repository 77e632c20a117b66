"""The report's sections for the paper's figure types (docs/paper.md), one module each.

Each module gives FIGURES ({file name: draw(runs, path) -> path or None}), summary_lines(runs)
(summary.md lines, [] when the runs hold nothing for it) and summary_json(runs) (summary.json's
"paper"[name], {} when nothing). report/cli.py draws the figures, report/summary.py writes the
lines after the depth section and the numbers under "paper".
"""
from __future__ import annotations

from fastwidth.report import coord, eos, loss_gap, offline, outputs, pointwise, spectral
from fastwidth.report.reader import Run

SECTIONS = {"offline": offline, "pointwise": pointwise, "outputs": outputs, "loss_gap": loss_gap,
            "spectral": spectral, "eos": eos, "coord": coord}


def figures() -> dict:
    return {name: draw for mod in SECTIONS.values() for name, draw in mod.FIGURES.items()}


def summary_lines(runs: list[Run]) -> list[str]:
    return [line for mod in SECTIONS.values() for line in mod.summary_lines(runs)]


def summary_json(runs: list[Run]) -> dict:
    out = {name: mod.summary_json(runs) for name, mod in SECTIONS.items()}
    return {name: doc for name, doc in out.items() if doc}
