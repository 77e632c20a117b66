"""`fastwidth report RUN_DIR... -o OUT`: PNG figures and summary.md from run directories."""
from __future__ import annotations

import logging
from pathlib import Path

from fastwidth.report import consistency_figures
from fastwidth.report.figures import FIGURES
from fastwidth.report.reader import load_run
from fastwidth.report.summary import write_summary

log = logging.getLogger("fastwidth.report")


def make_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Draw every figure the runs have data for into `out` and write out/summary.md; returns it."""
    runs = [load_run(p) for p in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, draw in {**FIGURES, **consistency_figures.FIGURES}.items():
        figures[name] = draw(runs, out / name)
        if figures[name] is None:
            log.info("%s: nothing to draw", name)
    return write_summary(runs, figures, out)


def cmd_report(args) -> int:
    path = make_report(args.runs, args.output)
    print(f"wrote {path} and the figures next to it")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="figures and summary.md from run directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (train.out_dir)")
    p.add_argument("-o", "--output", default="report", help="output directory")
    p.set_defaults(func=cmd_report)
