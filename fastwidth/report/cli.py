"""`fastwidth report RUN_DIR... -o OUT`: PNG figures and summary.md from run directories.

Runs are compared only where they were evaluated on the same probe split (reader.probe_identity):
the consistency numbers of runs on different probes do not measure the same thing. Such runs are
refused in one line, or, with `--allow-different-probes`, each probe's runs are drawn apart (OUT
for the first run's probe, OUT/probe<k>-<run>/ for each other) and the log and summary.md say
which comparisons were skipped.
"""
from __future__ import annotations

import logging
from pathlib import Path

from fastwidth.errors import UserError
from fastwidth.report import consistency_figures, depth, sections
from fastwidth.report.figures import FIGURES
from fastwidth.report.reader import Run, load_run, probe_identity
from fastwidth.report.summary import write_summary
from fastwidth.run.lock import undo_on_error
from fastwidth.run.outputs import check_target, replacing

log = logging.getLogger("fastwidth.report")


def probe_groups(runs: list[Run]) -> list[list[Run]]:
    """The runs grouped by the probe they were evaluated on, in the order given; a run that keeps
    no probe (nothing to tell it by) joins the first group."""
    for run in runs:
        run.probe = probe_identity(run)
    first = next((r.probe for r in runs if r.probe is not None), None)
    groups: dict[str | None, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.probe if run.probe is not None else first, []).append(run)
    return list(groups.values())


def skipped_comparisons(groups: list[list[Run]], allowed: bool) -> list[str]:
    """Lines naming the comparisons left out between runs on different probes; a UserError
    naming two of them unless `allowed`."""
    if len(groups) < 2:
        return []
    first = groups[0][0]
    if not allowed:
        other = groups[1][0]
        raise UserError(f"runs {first.path} and {other.path} were evaluated on different probe splits (probe hash "
                        f"{first.probe} vs {other.probe}), so their consistency numbers do not compare; report them "
                        f"apart, or pass --allow-different-probes to draw each probe's runs on their own")
    return [f"{', '.join(str(r.path) for r in groups[0])} (probe {first.probe}) not compared with "
            f"{', '.join(str(r.path) for r in g)} (probe {g[0].probe}): evaluated on different probe splits; "
            f"the latter drawn on their own in {_subdir(k, g)}/" for k, g in enumerate(groups[1:], start=2)]


def _subdir(k: int, group: list[Run]) -> str:
    """Where the figures of the k-th probe's runs go, inside the report's directory."""
    return f"probe{k}-{group[0].path.name}"


def _draw(runs: list[Run], out: Path, prefix: str = "") -> dict[str, Path | None]:
    """Every figure the runs have data for, into `out`; {name (with prefix): path or None}."""
    figures = {}
    across_depth = depth.FIGURES if any(depth.is_depth_sweep(r) for r in runs) else {}  # else: as before depth
    for name, draw in {**FIGURES, **consistency_figures.FIGURES, **across_depth, **sections.figures()}.items():
        figures[prefix + name] = draw(runs, out / name)
        if figures[prefix + name] is None:
            log.info("%s: nothing to draw", prefix + name)
    return figures


def make_report(run_dirs: list[str | Path], out: str | Path, need_figure: bool = False,
                allow_different_probes: bool = False) -> Path:
    """Draw every figure the runs have data for into `out` and write out/summary.md; returns it.
    need_figure (`fastwidth report`): a UserError, and no `out` left behind, when none can be drawn.
    Runs on different probes: a UserError unless allow_different_probes (module docstring)."""
    runs = [load_run(p) for p in run_dirs]
    for run in runs:  # one line each on stderr (and at the top of summary.md)
        if run.partial:
            log.warning("partial run %s: %s; drawing what is there", run.path, run.partial)
    groups = probe_groups(runs)
    skipped = skipped_comparisons(groups, allow_different_probes)
    for line in skipped:
        log.warning("%s", line)
    out = Path(out)
    with undo_on_error(out):  # nothing drawn: leave no empty report behind
        out.mkdir(parents=True, exist_ok=True)
        figures = _draw(groups[0], out)
        for k, group in enumerate(groups[1:], start=2):
            sub = _subdir(k, group)
            (out / sub).mkdir()
            figures.update(_draw(group, out / sub, prefix=f"{sub}/"))
        if need_figure and not any(figures.values()):
            why = "; ".join(f"{r.path}: {r.partial}" for r in runs if r.partial)
            raise UserError(f"nothing to draw: {why or 'the runs hold no rows the figures read'}")
    return write_summary(runs, figures, out, notes=[f"**Skipped** {line}." for line in skipped])


def cmd_report(args) -> int:
    out = Path(args.output)
    check_target(out, flag="report -o", force=args.force, kind="dir")
    with replacing(out, kind="dir") as tmp:
        make_report(args.runs, tmp, need_figure=True, allow_different_probes=args.allow_different_probes)
    print(f"wrote {out / 'summary.md'} and the figures next to it")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="figures and summary.md from run directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (train.out_dir)")
    p.add_argument("-o", "--output", default="report", help="output directory")
    p.add_argument("--force", action="store_true",
                   help="replace an existing OUT wholly (the new report is written beside it, then swapped in); "
                        "never a run directory's own files (RUN/report is the report's own and may be replaced)")
    p.add_argument("--allow-different-probes", action="store_true",
                   help="runs evaluated on different probe splits: draw each probe's runs apart and say in the "
                        "log and summary.md which comparisons were skipped (default: refuse)")
    p.set_defaults(func=cmd_report)
