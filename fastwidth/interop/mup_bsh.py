"""µP tables out of fastwidth: `fastwidth mup-table` rows and microsoft/mup base-shapes files.

A base-shapes (.bsh) file is what `mup.set_base_shapes(model, "file.bsh")` reads: YAML mapping
each parameter name to its shape at the base width, with null for dimensions that do not grow
with width. Which dimensions grow is found as mup's `make_base_shapes(base, delta)` does: build
the model (on meta, no memory) at param.base_width and at twice it and compare shapes.
"""
from __future__ import annotations

from pathlib import Path

import yaml

ROW_KEYS = ("name", "shape", "role", "init_std", "lr_mult", "wd_mult", "forward_mult", "init", "eps_mult", "branch_mult")
# mup's own header (mup.shape.__BSH_COMMENT__), so the file reads as one mup wrote
BSH_HEADER = ("\n# This is a base shape file encoded in yaml\n# - `null` indicates a dimension is \"finite\", "
              "i.e. a non-\"width\" dimension\n# - a number indicates the base dimension of an \"infinite\" "
              "dimension, i.e. some notion of \"width\"\n")


def _meta_model(cfg, width: int | None = None):
    from fastwidth.config import for_width
    from fastwidth.data import build_stream, data_io
    from fastwidth.models import build_meta
    wcfg = cfg if width is None else for_width(cfg, width)
    return wcfg, build_meta(wcfg, data_io(build_stream(cfg.data), cfg))


def mup_rows(config: str | None, overrides: list[str]) -> list[dict]:
    """{name, shape, role, init_std, lr_mult, wd_mult, forward_mult, init, eps_mult, branch_mult} per
    parameter; a user's model (model.arch python) adds `how`: inferred (from two widths), override
    (param.roles) or mup (read from microsoft/mup's infshapes)."""
    from fastwidth.config import load_config
    from fastwidth.param.scaling import mup_table, table_rows
    cfg, model = _meta_model(load_config(config, overrides))
    rows = [{k: r[k] for k in ROW_KEYS} for r in table_rows(mup_table(model, cfg))]
    if hasattr(model, "param_roles"):
        specs = model.param_roles()
        rows = [{**r, "how": specs[r["name"]].how} for r in rows]
    return rows


def base_shapes(cfg) -> dict[str, list[int | None]]:
    """{parameter name: [base dim, or None for a dimension that does not grow with width]}; a
    mup-prepared model's (model.arch python) from its parameters' infshapes."""
    from fastwidth.models.user import mup_prepared
    _, model = _meta_model(cfg)
    if mup_prepared(model):  # a model the user prepared with mup: its own base shapes, as it set them
        return {name: [d.base_dim for d in p.infshape] for name, p in model.named_parameters()}
    base = cfg.param.base_width
    _, at_base = _meta_model(cfg, base)
    _, at_delta = _meta_model(cfg, 2 * base)
    delta = dict(at_delta.named_parameters())
    return {name: [b if b != d else None for b, d in zip(p.shape, delta[name].shape)]
            for name, p in at_base.named_parameters()}


def write_base_shapes(config: str | None, overrides: list[str], path: str | Path) -> Path:
    from fastwidth.config import load_config
    from fastwidth.errors import UserError
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise UserError(f"mup-table --bsh {path}: directory {path.parent} does not exist")
    text = BSH_HEADER + yaml.safe_dump(base_shapes(load_config(config, overrides)), indent=4)
    path.write_text(text)
    return path
