"""`fastwidth` console entry: train, mup-table, coord-check, report, data, plan, export.

Every user error ends as one line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from fastwidth.errors import UserError


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config file" + ("" if required else " (default: built-in defaults)"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", nargs="+",
                   help="override a config key, e.g. --set optim.lr=3e-3 sweep.widths=[64,128]")


def overrides_of(args) -> list[str]:
    return [item for group in args.overrides for item in group]


def cmd_train(args) -> int:
    from fastwidth.config import load_config
    from fastwidth.train.loop import run
    run_dir = run(load_config(args.config, overrides_of(args)))
    print(f"run directory: {run_dir}")
    return 0


def cmd_mup_table(args) -> int:
    from fastwidth.config import load_config
    from fastwidth.data import build_stream
    from fastwidth.models import build_meta
    from fastwidth.param.scaling import mup_table, table_rows
    from fastwidth.train.loop import data_io
    cfg = load_config(args.config, overrides_of(args))
    model = build_meta(cfg, data_io(build_stream(cfg.data), cfg))
    rows = table_rows(mup_table(model, cfg))
    keys = ("name", "shape", "role", "init_std", "lr_mult", "wd_mult", "forward_mult", "init")
    rows = [{k: r[k] for k in keys} for r in rows]
    if args.format == "jsonl":
        print("\n".join(json.dumps(r) for r in rows))
    else:
        print("[\n" + ",\n".join("  " + json.dumps(r) for r in rows) + "\n]")
    return 0


def parse_widths(text: str) -> list[int]:
    """--widths "64,128,256" -> [64, 128, 256]; anything else is a one-line UserError."""
    widths = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise UserError(f"--widths: {item!r} is not a positive integer; give comma-separated widths like 64,128,256")
        widths.append(int(item))
    if len(set(widths)) != len(widths):
        raise UserError(f"--widths: {text!r} repeats a width")
    return widths


def cmd_coord_check(args) -> int:
    """Train fresh models of each width a few steps, per parameterization, and draw the panels."""
    from pathlib import Path

    from fastwidth.config import load_config, resolve
    from fastwidth.report.coord import plot_coord_check
    from fastwidth.stats.coord import coord_check, spread
    cfg = load_config(args.config, overrides_of(args))
    widths = parse_widths(args.widths) if args.widths else resolve(cfg).sweep.widths
    kinds = [k.strip() for k in args.kinds.split(",")] if args.kinds else [cfg.param.kind]
    # every kind and width is checked (choices, head_dim / n_heads divisibility, ...) before any work
    cfgs = [load_config(args.config, [*overrides_of(args), f"param.kind={k}", f"sweep.widths={widths}",
                                      "sweep.reference_width=0"]) for k in kinds]
    results = [coord_check(c, widths, steps=args.steps, seeds=tuple(range(args.seeds))) for c in cfgs]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coord_check.json").write_text(json.dumps(results[0] if len(results) == 1 else results, indent=1))
    plot_coord_check(results, out / "coord_check.png")
    for res in results:
        for name, layer in res["layers"].items():
            print(f"{res['kind']:4s} {name:32s} update RMS max/min across widths: {spread(layer['update_rms']):.2f}")
    print(f"wrote {out / 'coord_check.json'} and {out / 'coord_check.png'}")
    return 0


def add_coord_parser(sub) -> None:
    p = sub.add_parser("coord-check", help="per-layer activation change across widths: own-update and input-change parts")
    add_config_args(p, required=False)
    p.add_argument("--widths", default="", help="comma-separated widths (default: sweep.widths)")
    p.add_argument("--kinds", default="", help="parameterizations side by side, e.g. mup,sp (default: param.kind)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (one panel column each)")
    p.add_argument("--seeds", type=int, default=2, help="seeds averaged")
    p.add_argument("-o", "--output", default="coord_check", help="output directory")
    p.set_defaults(func=cmd_coord_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastwidth", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the sweep a config describes")
    add_config_args(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("mup-table", help="print the µP table (JSON rows) of the model a config builds")
    add_config_args(p, required=False)
    p.add_argument("--format", choices=["json", "jsonl"], default="json",
                   help="a JSON array (one row a line) or JSON lines")
    p.set_defaults(func=cmd_mup_table)

    # commands whose modules own their parsers (coordinate check, report, data, planning/export)
    from fastwidth.data.cli import add_data_parser
    from fastwidth.parallel.plan import add_parser as add_plan
    from fastwidth.report.cli import add_parser as add_report
    for add in (add_coord_parser, add_report, add_data_parser, add_plan):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"fastwidth: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fastwidth: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
