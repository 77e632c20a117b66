"""The loss gap ΔL_N = L_N - L_ref fitted against N early and late in training, with bootstrap intervals over seeds.

The section's protocol (report/sections.py): FIGURES {file name: draw(runs, path) -> path or
None}, summary_lines(runs) -> summary.md lines, summary_json(runs) -> summary.json's
"paper"["loss_gap"] (empty when the runs hold nothing for it).
"""
from __future__ import annotations

from fastwidth.report.reader import Run

FIGURES: dict = {}


def summary_lines(runs: list[Run]) -> list[str]:
    return []


def summary_json(runs: list[Run]) -> dict:
    return {}
