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

# the shared helpers (--config, --set) live below every room that adds a command
from fastwidth.config_args import add_config_args, find_config, overrides_of  # noqa: F401
from fastwidth.errors import UserError

# ------------------------------------------------------------------------------ commands of this module

def cmd_train(args) -> int:
    from fastwidth.api import train
    trust = ["train.trust_checkpoint=true"] if args.trust_checkpoint else []
    run_dir = train(args.config, overrides=overrides_of(args) + trust)
    print(f"run directory: {run_dir}")
    return 0


def add_trust_arg(p) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read a checkpoint holding files that need unpickling (one written by an earlier "
                        "fastwidth): only if you trust who wrote it, since unpickling can run code")


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


def parse_sizes(text: str, flag: str = "--widths", example: str = "64,128,256") -> list[int]:
    """--widths "64,128,256" -> [64, 128, 256] (or --depths); anything else is a one-line UserError."""
    sizes = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise UserError(f"{flag}: {item!r} is not a positive integer; give comma-separated {flag[2:]} like {example}")
        sizes.append(int(item))
    if len(set(sizes)) != len(sizes):
        raise UserError(f"{flag}: {text!r} repeats a {flag[2:-1]}")
    return sizes


def cmd_coord_check(args) -> int:
    """Train fresh models of each width (or, with --depths, each depth) a few steps, per
    parameterization, and draw the panels."""
    from pathlib import Path

    from fastwidth.config import load_config, resolve
    from fastwidth.report.coord import plot_coord_check, plot_coord_depth
    from fastwidth.stats.coord import coord_check, coord_check_depth, spread
    cfg = load_config(args.config, overrides_of(args))
    kinds = [k.strip() for k in args.kinds.split(",")] if args.kinds else [cfg.param.kind]
    seeds = tuple(range(args.seeds))
    if args.depths:
        if args.widths:
            raise UserError("coord-check: give --widths or --depths, not both (--depths runs at model.width)")
        depths = parse_sizes(args.depths, "--depths", "2,4,8,16")
        # every kind and depth is checked before any work
        cfgs = [[load_config(args.config, [*overrides_of(args), f"param.kind={k}", f"model.depth={d}"]) for d in depths]
                for k in kinds]
        results = [coord_check_depth(c[0], depths, steps=args.steps, seeds=seeds) for c in cfgs]
        axis, plot = "depths", plot_coord_depth
    else:
        widths = parse_sizes(args.widths) if args.widths else resolve(cfg).sweep.widths
        # every kind and width is checked (choices, head_dim / n_heads divisibility, ...) before any work
        cfgs = [load_config(args.config, [*overrides_of(args), f"param.kind={k}", f"sweep.widths={widths}",
                                          "sweep.reference_width=0"]) for k in kinds]
        results = [coord_check(c, widths, steps=args.steps, seeds=seeds) for c in cfgs]
        axis, plot = "widths", plot_coord_check
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coord_check.json").write_text(json.dumps(results[0] if len(results) == 1 else results, indent=1))
    plot(results, out / "coord_check.png")
    for res in results:
        for name, layer in res["layers"].items():
            print(f"{res['kind']:9s} {name:32s} update RMS max/min across {axis}: {spread(layer['update_rms']):.2f}")
    print(f"wrote {out / 'coord_check.json'} and {out / 'coord_check.png'}")
    return 0


def add_coord_parser(sub) -> None:
    p = sub.add_parser("coord-check", help="per-layer activation change across widths: own-update and input-change parts")
    add_config_args(p, required=False)
    p.add_argument("--widths", default="", help="comma-separated widths (default: sweep.widths)")
    p.add_argument("--depths", default="", help="comma-separated depths, e.g. 2,4,8,16: check across depth at "
                                                "model.width instead (embedding, blocks.last, final norm, readout)")
    p.add_argument("--kinds", default="", help="parameterizations side by side, e.g. mup,sp or mup,completep "
                                               "(default: param.kind)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (one panel column each)")
    p.add_argument("--seeds", type=int, default=2, help="seeds averaged")
    p.add_argument("-o", "--output", default="coord_check", help="output directory")
    p.set_defaults(func=cmd_coord_check)


def cmd_export(args) -> int:
    from fastwidth.interop.export import export, export_note
    out, names = export(args.run, args.output, fmt=args.format, member=args.member, force=args.force,
                        trust_checkpoint=args.trust_checkpoint)
    print(f"wrote {out} ({', '.join(names)}){export_note(out, args.format)}")
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train")
    add_config_args(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_trust_arg(p)  # sets train.trust_checkpoint
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
    p.add_argument("--force", action="store_true",
                   help="replace an existing OUT (a file by rename; a directory wholly: the new one is written "
                        "beside it, then swapped in); never a run directory's own files")
    add_trust_arg(p)
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
            "fastwidth export runs/demo --format hf --member w128_s0 -o w128_hf"),
    Command("mup-table", "fastwidth.cli:add_mup_table", "the µP table (JSON rows) of the model a config builds; "
            "--bsh writes a microsoft/mup base-shapes file", "fastwidth mup-table --config demo --set model.width=256"),
    Command("coord-check", "fastwidth.cli:add_coord_parser", "per-layer activation change across widths over the "
            "first steps, split into own-update and input-change parts; µP against SP (--depths: across depth, "
            "e.g. --depths 2,4,8,16 --kinds mup,completep)",
            "fastwidth coord-check --config demo --widths 32,64,128,256 --kinds mup,sp -o coord"),
    Command("plan", "fastwidth.parallel.plan_cli:add_parser", "per-rank memory for every backend, ZeRO stage and "
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: return the code instead of raising
        return e.code if isinstance(e.code, int) else 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from fastwidth.trainer.preempt import Preempted
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
