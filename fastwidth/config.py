"""One typed config tree: YAML (safe_load, data only) + dotted `--set a.b=v` overrides.

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-3", "sweep.widths=[64,128]"])

Every section is a dataclass (config_schema.py, re-exported here); a field's `choices` / `min`
metadata is checked on load, and cross-field rules live in `validate()`. Unknown keys are errors
that name the nearest valid key.
`resolve()` fills the defaults that depend on other keys (sweep widths, reference width, out_dir)
so the config saved in a run directory is complete and re-runnable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import time
import typing
from pathlib import Path
from typing import Any

import yaml

# the schema, re-exported: fastwidth.config is where every user imports it from
from fastwidth.config_schema import (SEED_MAX, SEED_MIN, Config, DataConfig, DistConfig, ModelConfig, OptimConfig,
                                     ParamConfig, StatsConfig, SweepConfig, TrainConfig)
from fastwidth.errors import ConfigError

HF_MODEL_TYPES = ("llama", "qwen2", "gpt_neox")  # model.arch hf: the families fastwidth.models.hf_families builds


# --------------------------------------------------------------------------- parsing

def _similarity(key: str, name: str) -> float:
    """How alike a mistyped key and a valid one are, in [0, 1]: the larger of their spelling
    ratio (difflib) and their word-level likeness, where a word matches another that it spells
    out or abbreviates (learning_rate ~ lr: initials; checkpoint ~ ckpt: in-order letters)."""
    a, b = key.lower(), name.lower()
    ratio = difflib.SequenceMatcher(None, a, b).ratio()
    wa, wb = [w for w in a.split("_") if w], [w for w in b.split("_") if w]
    if "".join(w[0] for w in wa) == b or "".join(w[0] for w in wb) == a:
        return max(ratio, 0.95)  # an acronym of the other's words: optim.learning_rate -> optim.lr

    def alike(u: str, v: str) -> bool:  # the same word, or one an in-order abbreviation of the other
        short, long_ = sorted((u, v), key=len)
        it = iter(long_)
        return short == long_ or (len(short) >= 2 and short[0] == long_[0] and all(c in it for c in short))
    matched = sum(any(alike(u, v) for v in wb) for u in wa) + sum(any(alike(v, u) for u in wa) for v in wb)
    return max(ratio, 0.9 * matched / (len(wa) + len(wb)) if wa and wb else 0.0)


def _nearest(key: str, valid, prefix: str = "") -> str:
    ranked = sorted(valid, key=lambda v: (-_similarity(key, v), v))
    if ranked and _similarity(key, ranked[0]) >= 0.5:
        return f" (did you mean '{prefix}{ranked[0]}'?)"
    return f" (valid: {', '.join(prefix + v for v in sorted(valid))})"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X], or Union[X, Y]: the first type that takes the value
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and type(None) in typing.get_args(tp):
            return None
        for a in args[:-1]:
            with contextlib.suppress(ConfigError):
                return _coerce(value, a, where)
        return _coerce(value, args[-1], where)
    bad = ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config annotation {tp} at {where}")


def _valid_range(meta) -> str:
    """The bounds of a field's metadata in words, e.g. '> 0', 'in [0, 1)', 'a finite number'."""
    lo = ("(", meta["above"]) if meta.get("above") is not None else ("[", meta.get("min"))
    hi = (")", meta["below"]) if meta.get("below") is not None else ("]", meta.get("max"))
    if lo[1] is not None and hi[1] is not None:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo[1] is not None:
        return f"{'>' if lo[0] == '(' else '>='} {lo[1]:g}"
    if hi[1] is not None:
        return f"{'<' if hi[0] == ')' else '<='} {hi[1]:g}"
    return "a finite number"


def _check_meta(f: dataclasses.Field, value: Any, where: str) -> None:
    meta = f.metadata
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below
        raise ConfigError(f"{where}: {value!r} is not a finite number; valid: {_valid_range(meta)}")
    if value is None or isinstance(value, (bool, str)):
        return
    lo, hi = meta.get("min"), meta.get("max")
    above, below = meta.get("above"), meta.get("below")
    if lo is not None and value < lo and above is None and below is None and hi is None:
        raise ConfigError(f"{where}: {value!r} is below the minimum {lo}")  # the line users know
    if ((lo is not None and value < lo) or (hi is not None and value > hi)
            or (above is not None and value <= above) or (below is not None and value >= below)):
        raise ConfigError(f"{where}: {value!r} is out of range; valid: {_valid_range(meta)}")


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{where}'{_nearest(str(key), fields, prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, where + ".")
        else:
            kwargs[key] = _coerce(value, tp, where)
            _check_meta(fields[key], kwargs[key], where)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Merge `a.b=v` strings into a raw config dict (values parsed as YAML scalars/lists)."""
    for item in overrides or []:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def _check_unique_keys(node, path: str = "", seen_nodes: set | None = None) -> None:
    """ConfigError naming a mapping key given twice and both its lines (plain YAML keeps the last
    one silently); walks the composed node tree, so the key comes with its section."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias of a node already checked
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may repeat base's keys
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key is not None and key in lines:
                raise ConfigError(f"key '{path}{key}' is given twice, at lines {lines[key]} and {line}; keep one")
            lines[key] = line
            _check_unique_keys(value_node, f"{path}{key}.", seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(item, path, seen_nodes)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        text = p.read_text()
        _check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text)
    except ConfigError as e:
        raise ConfigError(f"config file {p}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {p} is not valid YAML{loc}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def from_dict(data: dict, name: str = "run") -> Config:
    data = dict(data)
    data.setdefault("name", name)
    cfg = _build(Config, data, "")
    cfg.sweep.lrs = [_coerce(v, float, "sweep.lrs") for v in cfg.sweep.lrs]  # YAML reads 1e-3 as a string
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply overrides, type-check and validate it (not yet resolved)."""
    data = read_yaml(path) if path else {}
    name = Path(path).stem if path else "run"
    return from_dict(apply_overrides(data, overrides or []), name=name)


# --------------------------------------------------------------------------- rules

def validate(cfg: Config) -> None:
    """Cross-field rules. Raises ConfigError naming the offending key."""
    m = cfg.model
    t = cfg.train.threads
    if isinstance(t, bool) or (isinstance(t, str) and t != "auto") or (isinstance(t, int) and t < 0):
        raise ConfigError(f"train.threads: {t!r} is not a thread count >= 0 or auto")
    for key, values in (("sweep.widths", cfg.sweep.widths), ("sweep.seeds", cfg.sweep.seeds)):
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{key}: every entry must be an integer, got {v!r}")
    _check_seeds(cfg)
    for lr in cfg.sweep.lrs:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"sweep.lrs: every entry must be a positive number, got {lr!r}")
    if len(set(cfg.sweep.lrs)) != len(cfg.sweep.lrs):
        raise ConfigError(f"sweep.lrs has duplicates: {cfg.sweep.lrs}")
    if cfg.sweep.lr_refine and (len(cfg.sweep.lrs) < 2 or cfg.optim.lr_unit != "absolute"):
        raise ConfigError(f"sweep.lr_refine={cfg.sweep.lr_refine} refines a grid of absolute learning rates: it needs "
                          f"sweep.lrs with at least 2 entries (got {len(cfg.sweep.lrs)}) and optim.lr_unit=absolute")
    for w in cfg.sweep.widths:
        if w < 1:
            raise ConfigError(f"sweep.widths: width {w} must be positive")
    widths = cfg.sweep.widths or [m.width]
    _check_hf(cfg)
    if m.arch in ("gpt", "hf"):
        for w in widths:
            if m.n_heads:
                if w % m.n_heads:
                    raise ConfigError(f"model.width {w} is not divisible by model.n_heads={m.n_heads}")
                hd = w // m.n_heads
            else:
                if w % m.head_dim:
                    raise ConfigError(f"model.width {w} is not divisible by model.head_dim={m.head_dim}")
                hd = m.head_dim
            if hd % 2:
                raise ConfigError(f"head dimension {hd} (width {w}) must be even for RoPE")
            gpt_heads(m, w, cfg.param.base_width)  # grouped-query heads fit every width
        if m.act == "relu":
            raise ConfigError("model.act: relu is for mlp/resnet; gpt takes gelu or swiglu")
    _check_users_model(cfg)
    gpt_only = [f"model.{k}={getattr(m, k)}" for k in ("qk_norm", "n_kv_heads", "tie_embeddings") if getattr(m, k)
                and not (m.arch == "hf" and k == "n_kv_heads")]  # hf: its config's kv heads (model.hf's help)
    if m.arch != "gpt" and gpt_only:
        raise ConfigError(f"{', '.join(gpt_only)}: attention and token-embedding options are for gpt; "
                          f"model.arch={m.arch} has neither (leave them at their defaults)")
    if cfg.train.z_loss and cfg.train.loss != "ce":
        raise ConfigError(f"train.z_loss={cfg.train.z_loss} penalizes the logits' logsumexp of the cross-entropy; "
                          f"train.loss={cfg.train.loss} has none (set train.z_loss=0 or train.loss=ce)")
    if m.arch in ("mlp", "resnet") and m.act == "swiglu":
        raise ConfigError(f"model.act: swiglu is for gpt; {m.arch} takes relu or gelu")
    if len(cfg.optim.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas!r}")
    if cfg.sweep.reference_width and cfg.sweep.reference_width not in widths:
        raise ConfigError(f"sweep.reference_width {cfg.sweep.reference_width} is not in the widths {widths}")
    if len(set(widths)) != len(widths):
        raise ConfigError(f"sweep.widths has duplicates: {widths}")
    if len(set(cfg.sweep.seeds)) != len(cfg.sweep.seeds):
        raise ConfigError(f"sweep.seeds has duplicates: {cfg.sweep.seeds}")
    _check_depths(cfg)
    if cfg.dist.backend != "none" and (cfg.train.loss != "ce" or cfg.optim.lr_unit != "absolute"):
        raise ConfigError(f"train.loss={cfg.train.loss} / optim.lr_unit={cfg.optim.lr_unit} need dist.backend none")
    if cfg.dist.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"dist.zero_stage: {cfg.dist.zero_stage} is not one of 0, 1, 2, 3")
    if not 0.0 <= cfg.data.holdout_fraction < 1.0:
        raise ConfigError(f"data.holdout_fraction: {cfg.data.holdout_fraction} must be in [0, 1)")
    k = cfg.data.train_size
    if k and k < cfg.data.batch_size:
        raise ConfigError(f"data.train_size={k} is smaller than one batch (data.batch_size={cfg.data.batch_size}); "
                          f"valid: 0 (online) or >= {cfg.data.batch_size}")
    if k and cfg.train.full_batch:
        raise ConfigError(f"data.train_size={k} with train.full_batch: full-batch training already trains on one fixed "
                          "batch; set one of them")
    if not 0.0 <= cfg.data.label_noise <= 1.0:
        raise ConfigError(f"data.label_noise: {cfg.data.label_noise} must be in [0, 1]")
    if cfg.stats.ntk_output == "trace" and (m.arch == "gpt" or (m.arch in ("python", "hf") and _text_source(cfg))):
        raise ConfigError(f"stats.ntk_output=trace is for classifiers: a language model's vocabulary (model.arch="
                          f"{m.arch}, data.source={cfg.data.source}) makes it V× the cost; use stats.ntk_output=class")
    if cfg.param.kind in ("depth_mup", "completep") and m.arch == "mlp":
        # the depth rules scale residual branches (m_L^-α) and the LR of what sits on them; a plain
        # MLP has no residual stream, so there is nothing for them to act on
        raise ConfigError(f"param.kind={cfg.param.kind} scales residual branches; model.arch=mlp has none "
                          "(use model.arch gpt or resnet, or param.kind mup)")
    _check_param_optim(cfg)
    if cfg.param.attn_mult is not None and not (cfg.param.attn_mult > 0 and math.isfinite(cfg.param.attn_mult)):
        raise ConfigError(f"param.attn_mult: {cfg.param.attn_mult} must be a positive number or null")


def _check_hf(cfg: Config) -> None:
    """model.hf: only with model.arch hf, which needs its model_type (one of HF_MODEL_TYPES)."""
    m = cfg.model
    if m.arch != "hf":
        if m.hf:
            raise ConfigError(f"model.hf is for model.arch=hf; this run has model.arch={m.arch} (remove model.hf)")
        return
    mt = m.hf.get("model_type")
    if not mt:
        raise ConfigError(f"model.arch=hf needs model.hf.model_type: one of {', '.join(HF_MODEL_TYPES)}")
    if mt not in HF_MODEL_TYPES:
        raise ConfigError(f"model.hf.model_type {mt!r}: valid Hugging Face families are {', '.join(HF_MODEL_TYPES)}")
    # the GPT's own layout keys have no effect on a transformers family: its config says them
    layout = [f"model.{k}={getattr(m, k)}" for k, default in (("norm", "rms"), ("act", "auto"), ("bias", False),
                                                              ("rope_base", 10000.0)) if getattr(m, k) != default]
    if layout:
        raise ConfigError(f"{', '.join(layout)}: model.arch=hf takes its layout from the transformers config; set "
                          f"it in model.hf (e.g. hidden_act, attention_bias, rope_parameters) and leave these at "
                          f"their defaults")
CLASS_SOURCES = ("synthetic", "fmnist", "cifar5m", "imagefolder", "arrays")  # data/: the rest give tokens


def _text_source(cfg: Config) -> bool:
    return cfg.data.source not in CLASS_SOURCES


def _check_users_model(cfg: Config) -> None:
    """model.arch python / hf: the keys that say what to build are there and well formed, and
    the keys only they read are not set for fastwidth's own models (where they would do nothing).
    fastwidth's own-model keys (head_dim, act, norm ...) are not read for python: left alone."""
    m, roles = cfg.model, cfg.param.roles
    if m.arch == "python":
        if not m.factory:
            raise ConfigError("model.arch=python needs model.factory: \"package.module:function\" returning the "
                              "nn.Module at a width (or pass model=make to fastwidth.train)")
        mod, sep, fn = m.factory.partition(":")
        if not (sep and mod and fn):
            raise ConfigError(f"model.factory {m.factory!r}: write \"package.module:function\"")
        if m.act == "swiglu":
            raise ConfigError("model.act=swiglu: model.arch=python takes its activation from the factory's module "
                              "(leave model.act at auto)")
    elif m.factory:
        raise ConfigError(f"model.factory={m.factory!r} is read only with model.arch=python (model.arch={m.arch}); "
                          f"set model.arch=python or drop model.factory")
    if m.arch not in ("python", "hf") and roles:
        raise ConfigError(f"param.roles overrides inferred roles, for model.arch python or hf; model.arch={m.arch} "
                          f"assigns its own (drop param.roles)")


def _check_depths(cfg: Config) -> None:
    """sweep.depths: positive integers without duplicates; sweep.reference_depth (0 = the deepest)
    one of them; the combinations a depth sweep does not support refused."""
    sw = cfg.sweep
    for d in sw.depths:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ConfigError(f"sweep.depths: every entry must be a positive integer, got {d!r}")
    if len(set(sw.depths)) != len(sw.depths):
        raise ConfigError(f"sweep.depths has duplicates: {sw.depths}")
    if sw.reference_depth and sw.reference_depth not in (sw.depths or [None]):
        raise ConfigError(f"sweep.reference_depth {sw.reference_depth} is not in sweep.depths {sw.depths}"
                          + ("" if sw.depths else " (set sweep.depths, or leave reference_depth 0)"))
    if sw.depths and sw.lr_refine:
        raise ConfigError("sweep.lr_refine refines learning rates per width, not per (width, depth): "
                          "use it without sweep.depths")
    if sw.depths and cfg.stats.reference_run:
        raise ConfigError("stats.reference_run compares with a stored run's reference width, which has no depth "
                          "axis: use it without sweep.depths")


def gpt_heads(m: ModelConfig, width: int, base_width: int) -> tuple[int, int]:
    """(query heads, key/value heads) of a GPT at `width`.

    model.n_kv_heads counts the key/value heads at param.base_width (the base model whose shapes
    µP scales), and its group size G = heads / kv heads is kept at every width: with heads =
    width / head_dim the kv heads grow with width as the query heads do (so k and v stay hidden
    matrices, both dimensions growing); with fixed model.n_heads both counts are fixed.
    0 = as many kv heads as query heads (no grouping). Raises ConfigError when a width's heads
    are not a multiple of G."""
    heads = m.n_heads or width // m.head_dim
    if not m.n_kv_heads:
        return heads, heads
    base_heads = m.n_heads or base_width // m.head_dim
    if base_heads < 1 or base_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} (the kv heads at param.base_width={base_width}) must "
                          f"divide the {base_heads} query heads there")
    group = base_heads // m.n_kv_heads
    if heads % group:
        raise ConfigError(f"width {width} has {heads} query heads, not a multiple of the group size {group} that "
                          f"model.n_kv_heads={m.n_kv_heads} makes at param.base_width={base_width}")
    return heads, heads // group


def _check_param_optim(cfg: Config) -> None:
    """The combinations of param.kind and optim keys that the µP tables (param/scaling.py) cover."""
    p, o, kind = cfg.param, cfg.optim, cfg.param.kind
    if kind in ("depth_mup", "completep", "umup") and o.name == "sgd":
        raise ConfigError(f"param.kind={kind} has an Adam table only (CompleteP, Dey et al. 2025; u-µP); "
                          "use optim.name adamw or adam, or param.kind mup for SGD")
    if p.depth_alpha is not None and kind not in ("depth_mup", "completep"):
        raise ConfigError(f"param.depth_alpha={p.depth_alpha} sets the residual exponent of depth_mup and completep; "
                          f"param.kind={kind} has none (leave it null)")
    if o.eps_scaling == "width" and kind in ("sp", "ntk"):
        raise ConfigError(f"optim.eps_scaling=width scales ε by base_width / width under the µP kinds; "
                          f"param.kind={kind} has one ε (use none or auto)")
    if o.weight_decay_mode == "independent" and o.name != "adamw":
        raise ConfigError(f"optim.weight_decay_mode=independent is AdamW's decoupled decay; optim.name={o.name} "
                          "adds decay to the gradient (use optim.name adamw, or weight_decay_mode coupled)")
    if kind == "umup":
        _check_umup(cfg)


def _check_umup(cfg: Config) -> None:
    """u-µP where fastwidth's tables hold it (README, µP: what umup is and is not)."""
    p, m = cfg.param, cfg.model
    outside = [(m.arch == "resnet", "model.arch=resnet (unit_scaling has no rule for 2-D convolutions)"),
               (p.init == "torch", "param.init=torch (u-µP draws every matrix from N(0, σ²))"),
               (p.zero_query, "param.zero_query=true (u-µP's query starts at unit scale)"),
               (m.tie_embeddings, "model.tie_embeddings=true (u-µP's embedding and readout take different LR rules)"),
               (cfg.optim.weight_decay > 0 and cfg.optim.weight_decay_mode == "coupled",
                "optim.weight_decay > 0 with weight_decay_mode=coupled (u-µP's decay is independent)")]
    for bad, what in outside:
        if bad:
            raise ConfigError(f"param.kind=umup does not cover {what}; README (µP) says what umup is and is not")


def _check_seeds(cfg: Config) -> None:
    """Every seed key (any field named *seed, and sweep.seeds) within SEED_MIN..SEED_MAX."""
    seeds = [("sweep.seeds", v) for v in cfg.sweep.seeds]
    for section in dataclasses.fields(cfg):
        node = getattr(cfg, section.name)
        if dataclasses.is_dataclass(node):
            seeds += [(f"{section.name}.{f.name}", getattr(node, f.name)) for f in dataclasses.fields(node)
                      if f.name.endswith("seed")]
    for key, v in seeds:
        if not isinstance(v, bool) and isinstance(v, int) and not SEED_MIN <= v <= SEED_MAX:
            raise ConfigError(f"{key}: {v} is outside the seed range [-2^63, 2^63 - 1] "
                              f"(a signed 64-bit integer, what torch's generators take)")


def resolve(cfg: Config, now: float | None = None) -> Config:
    """Fill keys that default from others; the result is what a run directory records."""
    cfg = dataclasses.replace(cfg)
    cfg.sweep = dataclasses.replace(cfg.sweep)
    cfg.train = dataclasses.replace(cfg.train)
    if not cfg.sweep.widths:
        cfg.sweep.widths = [cfg.model.width]
    cfg.sweep.widths = sorted(cfg.sweep.widths)
    if not cfg.sweep.seeds:
        cfg.sweep.seeds = [cfg.train.seed]
    if not cfg.sweep.reference_width:
        cfg.sweep.reference_width = max(cfg.sweep.widths)
    if cfg.sweep.depths and not cfg.sweep.reference_depth:
        cfg.sweep.reference_depth = max(cfg.sweep.depths)
    if not cfg.train.out_dir:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
        cfg.train.out_dir = str(Path("runs") / f"{cfg.name}-{stamp}")
    cfg.train.out_dir = os.path.expanduser(cfg.train.out_dir)  # `--set train.out_dir=~/x` from a shell
    validate(cfg)
    return cfg


def for_width(cfg: Config, width: int) -> Config:
    """The config of one member of a sweep: same everything, model.width = width."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, width=width))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def reference_rows() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every key: the README's config reference is made from this."""
    rows = []
    for sec_name, cls in typing.get_type_hints(Config).items():
        if not dataclasses.is_dataclass(cls):
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tp = hints[f.name]
            tname = (" or ".join("null" if a is type(None) else a.__name__ for a in typing.get_args(tp))
                     if typing.get_origin(tp) is typing.Union else tp.__name__)
            choices = f.metadata.get("choices")
            help_ = f.metadata.get("help", "") + (f" ({' / '.join(map(str, choices))})" if choices else "")
            rows.append((f"{sec_name}.{f.name}", tname, repr(default), help_))
    return rows
