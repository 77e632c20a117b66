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

from fastwidth.config_args import config_path, shipped_configs, shipped_configs_dir  # noqa: F401 (public here)
from fastwidth.errors import CheckpointError, ConfigError  # noqa: F401 (CheckpointError: api.CheckpointError)
# a trained model back from its run directory: in trainer/, where hf export (interop/) reaches it too
from fastwidth.trainer.load import _latest, load_model, member_state, model_io  # noqa: F401 (public here)


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


def train(config="demo", *, model=None, overrides: list[str] | None = None, **kwargs) -> Path:
    """Train the sweep a config describes (path, shipped name, Config or dict); returns the run
    directory, which holds the report unless train.report=false. A SIGTERM stops it at a
    checkpoint and raises fastwidth.trainer.preempt.Preempted.

    model: your own module family, `make(width)` or `make(width, depth)` returning an nn.Module
    from the stream's inputs to logits (model.arch=python; its µP roles are inferred, see
    docs/your_model.md). A function importable by module and name is recorded in config.yaml as
    model.factory, so the run resumes from another process too."""
    if isinstance(model, dict):  # model={...}: the model section's overrides, as for any section
        kwargs, model = {**kwargs, "model": model}, None
    if model is not None:
        if not callable(model):
            raise ConfigError(f"model={model!r}: pass a function make(width) returning an nn.Module")
        from fastwidth.models.user import register_factory
        kwargs = {**kwargs, "model__arch": "python", "model__factory": register_factory(model)}
    cfg = make_config(config, overrides, **kwargs)  # a config mistake costs no torch import (seconds)
    from fastwidth.report.headline import report_at_end
    from fastwidth.trainer.loop import run
    return run(cfg, report=report_at_end)


def load_run(run_dir: str | Path):
    """A run directory read through its contract: .config (dict), .rows(kind, **match),
    .series(kind, key), .widths, .ref_width, .signatures (see fastwidth.report.reader.Run)."""
    from fastwidth.report.reader import load_run as read
    return read(run_dir)
