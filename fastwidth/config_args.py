"""Finding a config and reading `--config` / `--set` from a command line.

Below every room that builds a command (parallel/plan's `fastwidth plan`, data/, report/, cli.py):
the helpers live here, at the bottom of the layer order, so that no command module imports the
CLI above it. fastwidth.cli and fastwidth.api re-export them under their old names.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fastwidth.errors import ConfigError, UserError


def shipped_configs_dir() -> Path | None:
    """configs/ as installed (fastwidth/configs in a wheel) or beside the package (a checkout)."""
    here = Path(__file__).resolve().parent
    for d in (here / "configs", here.parent / "configs"):
        if d.is_dir():
            return d
    return None


def shipped_configs() -> list[str]:
    d = shipped_configs_dir()
    return sorted(str(p.relative_to(d).with_suffix("")) for p in d.rglob("*.yaml")) if d else []


def config_path(spec: str | Path) -> Path:
    """A config file path, or the name of a shipped config ("demo", "dist/sweep_ddp_cpu")."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    d = shipped_configs_dir()
    if d is not None and not p.is_absolute():
        for cand in (d / p, d / f"{p}.yaml"):
            if cand.is_file():
                return cand
    raise ConfigError(f"config {spec} is neither a file nor a shipped config ({', '.join(shipped_configs())})")


def find_config(spec: str) -> str:
    """A --config value: a YAML path, or the name of a config shipped with fastwidth ("demo")."""
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
