"""fastwidth from Python (notebooks, scripts): train a sweep, read a run, load a trained model.

    import fastwidth
    run_dir = fastwidth.train("demo", train__steps=50, sweep__widths=[32, 64])
    run = fastwidth.load_run(run_dir)              # rows of metrics.jsonl, config, signatures
    model = fastwidth.load_model(run_dir, "w64_s0")
    logits = model(tokens)                          # (B, T, vocab) for the GPT

Overrides are keyword arguments `section__key=value` (a dotted key `section.key`), or a mapping
per section (`optim={"lr": 3e-3}`), or `overrides=["optim.lr=3e-3"]` as on the command line.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from fastwidth.errors import CheckpointError, ConfigError


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


def _override_items(kwargs: dict) -> dict[str, object]:
    items = {}
    for name, value in kwargs.items():
        if "__" in name:
            items[name.replace("__", ".")] = value
        elif isinstance(value, dict):
            items.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            raise ConfigError(f"override {name}={value!r}: write section__key=value (e.g. train__steps=50) "
                              f"or {name}={{key: value}}")
    return items


def make_config(config=None, overrides: list[str] | None = None, **kwargs):
    """A validated Config from a path, a shipped name, a Config or a dict, with overrides applied."""
    from fastwidth.config import Config, apply_overrides, from_dict, read_yaml
    if isinstance(config, Config):
        data, name = config.to_dict(), config.name
    elif isinstance(config, dict):
        data, name = dict(config), str(config.get("name", "run"))
    elif config is None:
        data, name = {}, "run"
    else:
        path = config_path(config)
        data, name = read_yaml(path), path.stem
    data = apply_overrides(data, list(overrides or []))
    for key, value in _override_items(kwargs).items():  # Python values as they are, no YAML parsing
        *sections, last = key.split(".")
        node = data
        for s in sections:
            node = node.setdefault(s, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: '{s}' is not a section")
        node[last] = value
    data.pop("name", None)
    return from_dict(data, name=name)


def train(config="demo", *, overrides: list[str] | None = None, **kwargs) -> Path:
    """Train the sweep a config describes (path, shipped name, Config or dict); returns the run
    directory, which holds the report unless train.report=false. A SIGTERM stops it at a
    checkpoint and raises fastwidth.train.preempt.Preempted."""
    cfg = make_config(config, overrides, **kwargs)  # a config mistake costs no torch import (seconds)
    from fastwidth.train.loop import run
    return run(cfg)


def load_run(run_dir: str | Path):
    """A run directory read through its contract: .config (dict), .rows(kind, **match),
    .series(kind, key), .widths, .ref_width, .signatures (see fastwidth.report.reader.Run)."""
    from fastwidth.report.reader import load_run as read
    return read(run_dir)


def _latest(run_dir: Path) -> Path:
    from fastwidth.train.checkpoint import latest_checkpoint
    found = latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    if found is None:
        raise CheckpointError(f"{run_dir} holds no checkpoint (train.out_dir of a finished or stopped run?)")
    return found


def member_state(checkpoint: Path, name: str | None) -> tuple[str, dict, dict]:
    """(member name, full fp32 state dict, checkpoint meta) of one member; the only member when
    `name` is None. Works for single-process and sharded (ddp, fsdp2, deepspeed) checkpoints."""
    from fastwidth.parallel.checkpoint import _member_state
    from fastwidth.train.checkpoint import read_checkpoint
    meta = read_checkpoint(checkpoint)
    names = [e["name"] for e in meta["members"]]
    if name is None and len(names) == 1:
        name = names[0]
    if name not in names:
        raise CheckpointError(f"checkpoint {checkpoint} has no model {name} (it holds {', '.join(names)}); "
                              f"name one with member=")
    return name, _member_state(checkpoint, meta, name), meta


def model_io(cfg, run_dir: Path, state: dict) -> SimpleNamespace:
    """What building the model needs to know about the data, from the run itself (the data need
    not be present): classes and vocabulary from the readout, input shape from probe.safetensors."""
    from fastwidth.models import KIND_OF_ARCH
    kind = KIND_OF_ARCH[cfg.model.arch]
    outputs = int(state["readout.weight"].shape[0])
    in_shape = None
    if kind == "classes":
        probe = run_dir / "probe.safetensors"
        if probe.is_file():
            from safetensors import safe_open
            with safe_open(str(probe), "pt") as f:
                in_shape = tuple(f.get_slice("x").get_shape()[1:])
        else:  # an MLP's first layer says its flat input size
            first = next(k for k in state if k.endswith("weight"))
            in_shape = (int(state[first].shape[1]),)
    return SimpleNamespace(kind=kind, vocab_size=outputs if kind == "tokens" else None, seq_len=cfg.data.seq_len,
                           in_shape=in_shape, num_classes=outputs if kind == "classes" else None)


def load_model(run_dir: str | Path, member: str | None = None, device="cpu"):
    """The trained model `member` (e.g. "w64_s0"; may be omitted when the run has one) from the
    latest checkpoint of `run_dir`, in eval mode on `device`. Its forward gives logits; its µP
    table is `model.mup_table`."""
    import torch
    from fastwidth.config import for_width, from_dict, read_yaml
    from fastwidth.models import build_model
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    name, state, meta = member_state(_latest(run_dir), member)
    cfg = from_dict(read_yaml(run_dir / "config.yaml"))
    wcfg = for_width(cfg, int(next(e["width"] for e in meta["members"] if e["name"] == name)))
    model, table = build_model(wcfg, model_io(wcfg, run_dir, state), device="cpu", seed=0)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    model.mup_table, model.config = table, wcfg
    return model.to(device).eval()
