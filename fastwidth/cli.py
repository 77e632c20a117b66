"""`fastwidth` console entry: train, demo, report, export, mup-table, coord-check, plan, build-ext, data.

Every user error ends as one line on stderr and exit code 2; anything else is a bug and keeps
its traceback. `fastwidth --help` imports nothing heavy: each command's parser is built (and its
module imported) only when that command is asked for.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass

from fastwidth.errors import UserError

# ------------------------------------------------------------------------------ shared helpers


def find_config(spec: str) -> str:
    """A --config value: a YAML path, or the name of a config shipped with fastwidth ("demo")."""
    from fastwidth.api import config_path
    try:
        return str(config_path(spec))
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, type=find_config,
                   help="YAML config file, or the name of a shipped one (demo, fmnist_mlp, gpt_shakespeare, ...)"
                        + ("" if required else "; default: built-in defaults"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", nargs="+",
                   help="override a config key, e.g. --set optim.lr=3e-3 sweep.widths=[64,128]")


def overrides_of(args) -> list[str]:
    return [item for group in args.overrides for item in group]


# ------------------------------------------------------------------------------ commands of this module

def cmd_train(args) -> int:
    from fastwidth.api import train
    run_dir = train(args.config, overrides=overrides_of(args))
    print(f"run directory: {run_dir}")
    return 0


def cmd_demo(args) -> int:
    from fastwidth.api import train
    run_dir = train("demo", overrides=overrides_of(args))
    print(f"run directory: {run_dir}")
    return 0


def cmd_mup_table(args) -> int:
    from fastwidth.interop.mup_bsh import mup_rows, write_base_shapes
    rows = mup_rows(args.config, overrides_of(args))
    if args.bsh:
        path = write_base_shapes(args.config, overrides_of(args), args.bsh)
        print(f"wrote {path} (microsoft/mup base shapes, {len(rows)} tensors)", file=sys.stderr)
    if args.format == "jsonl":
        print("\n".join(json.dumps(r) for r in rows))
    else:
        print("[\n" + ",\n".join("  " + json.dumps(r) for r in rows) + "\n]")
    return 0


def cmd_export(args) -> int:
    from fastwidth.interop.export import export
    out, names = export(args.run, args.output, fmt=args.format, member=args.member)
    print(f"wrote {out} ({', '.join(names)})")
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train")
    add_config_args(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)


def add_demo(sub) -> None:
    p = sub.add_parser("demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", nargs="+",
                   help="override a key of the demo config, e.g. --set train.steps=50")
    p.set_defaults(func=cmd_demo)


def add_mup_table(sub) -> None:
    p = sub.add_parser("mup-table")
    add_config_args(p, required=False)
    p.add_argument("--format", choices=["json", "jsonl"], default="json",
                   help="a JSON array (one row a line) or JSON lines")
    p.add_argument("--bsh", metavar="FILE", default=None,
                   help="also write a microsoft/mup base-shapes file (mup.load_base_shapes reads it)")
    p.set_defaults(func=cmd_mup_table)


def add_export(sub) -> None:
    p = sub.add_parser("export")
    p.add_argument("run", metavar="RUN", help="a run directory, its checkpoints/ directory, or one step_* checkpoint")
    p.add_argument("-o", "--output", required=True,
                   help="safetensors: the .safetensors file to write; hf: the directory to write")
    p.add_argument("--format", choices=["safetensors", "hf"], default="safetensors",
                   help="safetensors: full fp32 weights (all members, or --member); hf: a Hugging Face "
                        "Llama checkpoint that transformers loads (GPT with RMSNorm, SwiGLU, RoPE)")
    p.add_argument("--member", default=None, help="one model, e.g. w64_s0 (required for --format hf)")
    p.set_defaults(func=cmd_export)


# ------------------------------------------------------------------------------ the command table

@dataclass(frozen=True)
class Command:
    name: str
    adder: str          # "module:function" that adds the command's subparser
    description: str
    example: str


COMMANDS = [
    Command("train", "fastwidth.cli:add_train", "train the sweep a config describes; writes the run directory and "
            "its report", "fastwidth train --config demo --set train.steps=500 train.out_dir=runs/long"),
    Command("demo", "fastwidth.cli:add_demo", "the demo: a µP GPT width sweep on the stdlib's source, with its "
            "report (< 5 min on 2 cores)", "fastwidth demo --set train.out_dir=runs/demo"),
    Command("report", "fastwidth.report.cli:add_parser", "PNG figures and summary.md from run directories",
            "fastwidth report runs/demo-20261128-120000 -o report"),
    Command("export", "fastwidth.cli:add_export", "a trained model as safetensors, or as a Hugging Face checkpoint",
            "fastwidth export runs/demo --format hf --member w128_s0 -o hf/w128"),
    Command("mup-table", "fastwidth.cli:add_mup_table", "the µP table (JSON rows) of the model a config builds; "
            "--bsh writes a microsoft/mup base-shapes file", "fastwidth mup-table --config demo --set model.width=256"),
    Command("coord-check", "fastwidth.stats.coord:add_parser", "per-layer activation and update RMS across widths "
            "over the first steps", "fastwidth coord-check --config demo --widths 32,64,128,256 -o coord"),
    Command("plan", "fastwidth.parallel.plan:add_parser", "per-rank memory for every backend, ZeRO stage and "
            "offload, and the widest GPT that fits", "fastwidth plan --config configs/dist/gpt_16k_8gpu.yaml"),
    Command("build-ext", "fastwidth.kernels.native:add_parser", "build the native C++ ops (csrc/) now instead "
            "of on first use; prints the build time", "fastwidth build-ext"),
    Command("data", "fastwidth.data.cli:add_data_parser", "prepare (tokenize once into shards) and inspect data "
            "sources", "fastwidth data prepare --source text --path corpus/ --tokenizer bpe --out shards/"),
]
BY_NAME = {c.name: c for c in COMMANDS}


def _version() -> str:
    from fastwidth import __version__
    return __version__


def _import_adder(spec: str):
    import importlib
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


class OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes end like every other user error: one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"fastwidth: error: {self.prog.split(' ', 1)[-1] + ': ' if ' ' in self.prog else ''}"
                     f"{message} (see {self.prog} --help)\n")


def build_parser(full: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser with every command: those in `full` (default: all) fully defined, their modules
    imported; the others as stubs that carry their description (what `fastwidth --help` needs)."""
    parser = OneLineErrors(
        prog="fastwidth", description="Train µP networks at many widths on one online stream and measure, while "
                                      "they train, whether the narrow ones behave like the wide one.",
        epilog="examples:\n" + "\n".join(f"  {c.example}" for c in COMMANDS)
               + "\n\nfastwidth COMMAND --help describes one command.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastwidth {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS if full is None else [BY_NAME[n] for n in full]:
        _import_adder(c.adder)(sub)
        p = sub.choices[c.name]
        p.description, p.epilog = c.description[0].upper() + c.description[1:] + ".", f"example:\n  {c.example}"
        p.formatter_class = argparse.RawDescriptionHelpFormatter
    for c in COMMANDS:  # the rest as stubs (name and description), so the overview imports nothing
        if c.name not in sub.choices:
            sub.add_parser(c.name, help=c.description)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([command] if command in BY_NAME and argv[0] == command else [])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from fastwidth.train.preempt import Preempted
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"fastwidth: error: {e}", file=sys.stderr)
        return e.exit_code
    except Preempted as e:
        print(f"fastwidth: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fastwidth: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
