"""Offline against online training (data.train_size): per width the training-subset loss beside the probe loss, and the consistency statistics of runs side by side (fastwidth report RUN_A RUN_B).

The section's protocol (report/sections.py): FIGURES {file name: draw(runs, path) -> path or
None}, summary_lines(runs) -> summary.md lines, summary_json(runs) -> summary.json's
"paper"["offline"] (empty when the runs hold nothing for it).
"""
from __future__ import annotations

from fastwidth.report.reader import Run

FIGURES: dict = {}


def summary_lines(runs: list[Run]) -> list[str]:
    return []


def summary_json(runs: list[Run]) -> dict:
    return {}
