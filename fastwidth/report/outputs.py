"""V_N for three outputs: the raw true logit, the centered true logit z_y - mean_c z_c and log p_y, so a flattening caused by the softmax-invariant shift is told from a real one.

The section's protocol (report/sections.py): FIGURES {file name: draw(runs, path) -> path or
None}, summary_lines(runs) -> summary.md lines, summary_json(runs) -> summary.json's
"paper"["outputs"] (empty when the runs hold nothing for it).
"""
from __future__ import annotations

from fastwidth.report.reader import Run

FIGURES: dict = {}


def summary_lines(runs: list[Run]) -> list[str]:
    return []


def summary_json(runs: list[Run]) -> dict:
    return {}
