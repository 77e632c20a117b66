"""`fastwidth report RUN_DIR... -o OUT`: PNG figures and summary.md from run directories."""
from __future__ import annotations

import logging
from pathlib import Path

from fastwidth.errors import UserError
from fastwidth.report import consistency_figures
from fastwidth.report.figures import FIGURES
from fastwidth.report.reader import load_run
from fastwidth.report.summary import write_summary
from fastwidth.run.lock import undo_on_error

log = logging.getLogger("fastwidth.report")


def make_report(run_dirs: list[str | Path], out: str | Path, need_figure: bool = False) -> Path:
    """Draw every figure the runs have data for into `out` and write out/summary.md; returns it.
    need_figure (`fastwidth report`): a UserError, and no `out` left behind, when none can be drawn."""
    runs = [load_run(p) for p in run_dirs]
    for run in runs:  # one line each on stderr (and at the top of summary.md)
        if run.partial:
            log.warning("partial run %s: %s; drawing what is there", run.path, run.partial)
    out = Path(out)
    with undo_on_error(out):  # nothing drawn: leave no empty report behind
        out.mkdir(parents=True, exist_ok=True)
        figures = {}
        for name, draw in {**FIGURES, **consistency_figures.FIGURES}.items():
            figures[name] = draw(runs, out / name)
            if figures[name] is None:
                log.info("%s: nothing to draw", name)
        if need_figure and not any(figures.values()):
            why = "; ".join(f"{r.path}: {r.partial}" for r in runs if r.partial)
            raise UserError(f"nothing to draw: {why or 'the runs hold no rows the figures read'}")
    return write_summary(runs, figures, out)


def cmd_report(args) -> int:
    path = make_report(args.runs, args.output, need_figure=True)
    print(f"wrote {path} and the figures next to it")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="figures and summary.md from run directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (train.out_dir)")
    p.add_argument("-o", "--output", default="report", help="output directory")
    p.set_defaults(func=cmd_report)
