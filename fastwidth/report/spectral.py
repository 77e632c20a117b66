"""The spectral mechanism where a bias exists: seed-averaged eNTK eigenvalues and task power C(k) across widths, ΔC(k) against the debiased b², a same-width baseline and kernel regression with each width's ensemble after-kernel.

The section's protocol (report/sections.py): FIGURES {file name: draw(runs, path) -> path or
None}, summary_lines(runs) -> summary.md lines, summary_json(runs) -> summary.json's
"paper"["spectral"] (empty when the runs hold nothing for it).
"""
from __future__ import annotations

from fastwidth.report.reader import Run

FIGURES: dict = {}


def summary_lines(runs: list[Run]) -> list[str]:
    return []


def summary_json(runs: list[Run]) -> dict:
    return {}
