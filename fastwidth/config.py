"""One typed config tree: YAML (safe_load, data only) + dotted `--set a.b=v` overrides.

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-3", "sweep.widths=[64,128]"])

Every section is a dataclass; a field's `choices` / `min` metadata is checked on load, and
cross-field rules live in `validate()`. Unknown keys are errors that name the nearest valid key.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from fastwidth.errors import ConfigError


def _opt(default, *, choices=None, min=None, help=""):
    """A dataclass field carrying validation metadata (and a one-line help for the README)."""
    meta = {"choices": choices, "min": min, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    arch: str = _opt("gpt", choices=["gpt", "mlp", "resnet"], help="model family")
    width: int = _opt(128, min=1, help="hidden width N (gpt: d_model; mlp: hidden units; resnet: first-stage channels)")
    depth: int = _opt(2, min=1, help="gpt: blocks; mlp: hidden layers; resnet: blocks per stage")
    head_dim: int = _opt(32, min=1, help="gpt: per-head dimension when n_heads is 0 (n_heads = width / head_dim)")
    n_heads: int = _opt(0, min=0, help="gpt: fixed head count (head_dim = width / n_heads); 0 = width / head_dim")
    mlp_ratio: int = _opt(4, min=1, help="gpt: MLP hidden size = mlp_ratio * width")
    norm: str = _opt("rms", choices=["rms", "layer"], help="gpt: RMSNorm or LayerNorm (pre-norm)")
    act: str = _opt("auto", choices=["auto", "gelu", "swiglu", "relu"], help="activation; auto = gelu (gpt), relu (mlp, resnet)")
    rope_base: float = _opt(10000.0, min=1.0, help="gpt: RoPE base")
    bias: bool = _opt(False, help="gpt: biases in linear layers (mlp and resnet readouts always have one)")


@dataclass
class ParamConfig:
    kind: str = _opt("mup", choices=["mup", "sp", "ntk", "mean_field"], help="parameterization (README: the µP table)")
    base_width: int = _opt(64, min=1, help="width at which every kind equals sp; m = width / base_width")
    gamma0: float = _opt(1.0, min=1e-12, help="mean_field richness γ0 (output ÷γ0, LR ×γ0 Adam / ×γ0² SGD)")
    output_mult: float = _opt(1.0, help="readout forward multiplier α (µP: α / m)")
    attn_mult: Optional[float] = _opt(None, help="attention logits scale attn_mult / head_dim; null = sqrt(base head_dim)")
    init_std: float = _opt(1.0, min=0.0, help="σ: matrices ~ N(0, σ² / fan_in) (at base width for input/output)")
    embed_std: float = _opt(1.0, min=0.0, help="token embedding std (gpt)")
    zero_readout: bool = _opt(True, help="µP kinds: zero-initialize the readout weight")
    zero_query: bool = _opt(False, help="µP kinds: zero-initialize the attention query weight")


@dataclass
class OptimConfig:
    name: str = _opt("adamw", choices=["adamw", "adam", "sgd"], help="optimizer")
    lr: float = _opt(1e-3, min=0.0, help="base learning rate η (per-group lr = η × lr_mult × schedule)")
    weight_decay: float = _opt(0.0, min=0.0, help="base weight decay (per-group wd = wd × wd_mult)")
    betas: list = _opt([0.9, 0.999], help="Adam betas")
    eps: float = _opt(1e-8, min=0.0, help="Adam epsilon")
    momentum: float = _opt(0.0, min=0.0, help="SGD momentum")
    grad_clip: float = _opt(1.0, min=0.0, help="global gradient-norm clip per model; 0 = off")
    schedule: str = _opt("constant", choices=["constant", "linear", "cosine"], help="LR schedule after warmup")
    warmup_steps: int = _opt(0, min=0, help="linear warmup steps")
    decay_steps: int = _opt(0, min=0, help="horizon of linear/cosine decay; 0 = train.steps (set it to extend a run by resuming)")
    min_lr_ratio: float = _opt(0.0, min=0.0, help="final LR as a fraction of the peak for linear/cosine")
    lr_unit: str = _opt("absolute", choices=["absolute", "edge"], help="edge: optim.lr and sweep.lrs are multiples of 2/λ0, λ0 = each member's initial lr-preconditioned sharpness on its first training batch")


@dataclass
class DataConfig:
    source: str = _opt("stdlib", choices=["stdlib", "synthetic", "text", "shakespeare", "gensim", "shards", "fmnist",
                                          "cifar5m", "imagefolder", "arrays"],
                       help="data source (README: data sources)")
    path: str = _opt("", help="file or directory for file-backed sources")
    tokenizer: str = _opt("bytes", help="bytes | bpe | a tokenizer.json | a GPT-2 vocab.json (merges.txt beside it) or its directory")
    bpe_vocab_size: int = _opt(1024, min=260, help="vocabulary of a BPE tokenizer trained offline")
    seq_len: int = _opt(128, min=1, help="tokens per training sequence")
    batch_size: int = _opt(32, min=1, help="global batch of one optimizer step, split across data-parallel ranks")
    micro_batch_size: int = _opt(0, min=0, help="rows per forward on each rank (gradient accumulation over the rank's share of batch_size); 0 = the whole share")
    seed: int = _opt(0, help="data order seed (independent of the init seeds)")
    probe_size: int = _opt(64, min=1, help="held-out probe examples (sequences for text), same for every model")
    holdout_fraction: float = _opt(0.02, min=0.0, help="fraction of the corpus held out for the probe split")
    epochs: int = _opt(1, min=1, help="passes allowed over the training split; >1 repeats examples (logged)")
    in_dim: int = _opt(32, min=1, help="synthetic: input dimension")
    num_classes: int = _opt(10, min=2, help="synthetic: classes of the teacher; arrays / imagefolder: label range")
    teacher_width: int = _opt(64, min=1, help="synthetic: teacher MLP width")
    label_noise: float = _opt(0.0, min=0.0, help="synthetic: probability that a training label is replaced by a uniform random class (the probe keeps the teacher's labels)")
    cache_dir: str = _opt("", help="where tokenized corpora and tokenizers are cached; empty = ~/.cache/fastwidth")
    text_field: str = _opt("text", help="jsonl field / parquet column holding the text")
    bpe_train_bytes: int = _opt(4_000_000, min=1, help="bpe: text from the head of the training split the tokenizer is trained on")
    image_size: int = _opt(0, min=0, help="imagefolder: resize images to this square size; 0 = keep (all must match)")
    normalize: bool = _opt(True, help="images: per-channel mean/std normalization computed once on the training split")
    max_undecodable: float = _opt(0.01, min=0.0, help="text: refuse a corpus file whose share of bytes that are not UTF-8 (in its first 256 KB) exceeds this; 1 = accept anything (bytes are decoded with replacement)")
    allow_missing_classes: bool = _opt(False, help="classifiers: train even when the training labels hold fewer than data.num_classes classes (the readout, probe metrics and eNTK class assume all of them)")


@dataclass
class TrainConfig:
    steps: int = _opt(100, min=0, help="optimizer steps")
    out_dir: str = _opt("", help="run directory; empty = runs/<config name>-<UTC time>")
    seed: int = _opt(0, help="init seed of a single model (sweep.seeds overrides)")
    resume: Union[bool, str] = _opt(False, choices=[False, True, "auto"],
                                    help="continue from the latest checkpoint in out_dir; auto = resume when one exists, else start fresh (requeued jobs)")
    overwrite: bool = _opt(False, help="allow starting fresh in a run directory that already holds a run")
    device: str = _opt("auto", choices=["auto", "cpu", "cuda"], help="auto = cuda when present")
    precision: str = _opt("auto", choices=["auto", "fp32", "bf16"], help="auto = bf16 autocast on GPU, fp32 on CPU")
    kernels: str = _opt("auto", choices=["auto", "torch", "triton", "native"],
                        help="auto = triton on CUDA, native C++ ops on CPU when they build, torch elsewhere")
    compile: bool = _opt(False, help="torch.compile each model's forward and loss (backward through AOTAutograd); single-process runs")
    log_every: int = _opt(10, min=1, help="train rows in metrics.jsonl every this many steps")
    ckpt_every: int = _opt(0, min=0, help="checkpoint cadence in steps; 0 = only at the end")
    ckpt_minutes: float = _opt(30.0, min=0.0, help="also checkpoint every this many minutes of wall time; 0 = off")
    keep_checkpoints: int = _opt(2, min=1, help="checkpoints kept in out_dir/checkpoints")
    progress: bool = _opt(True, help="tqdm progress bar")
    threads: Union[int, str] = _opt(0, help="torch CPU threads; 0 = torch default; auto = the cores this process may use (sched_getaffinity, shared by the node's local ranks) less the 1-minute load average of the others, at least 1 (busy-waiting OpenMP workers on a loaded machine cost up to 50x)")
    activation_checkpointing: str = _opt("none", choices=["none", "block"], help="recompute each block's forward in backward instead of keeping its activations")
    full_batch: bool = _opt(False, help="every step trains on the same fixed batch: the stream's first data.batch_size examples (gradient descent, for edge-of-stability and catapult studies)")
    loss: str = _opt("ce", choices=["ce", "mse"], help="training loss: cross-entropy, or MSE to one-hot targets 0.5·Σ_c (f_c - y_c)² (mean over targets)")
    diverge_factor: float = _opt(10.0, min=0.0, help="stop a member whose loss exceeds this multiple of its first loss (a non-finite loss always stops it); 0 = only non-finite")
    report: bool = _opt(True, help="write the report (figures, summary.md, summary.json) into out_dir/report at the end")
    tensorboard: bool = _opt(False, help="also write the metrics rows as TensorBoard scalars into out_dir/tensorboard")
    csv: bool = _opt(False, help="also write the metrics rows into out_dir/metrics.csv (long format: one value a line)")


@dataclass
class SweepConfig:
    widths: list = _opt([], help="widths trained on the same stream; empty = [model.width]")
    seeds: list = _opt([], help="init seeds per width; empty = [train.seed]")
    reference_width: int = _opt(0, min=0, help="width the others are compared with; 0 = the largest")
    mode: str = _opt("lockstep", choices=["lockstep", "sequential"], help="all models per batch, or one after another")
    lrs: list = _opt([], help="base learning rates: every (width, lr, seed) is a member on the same batches; empty = [optim.lr]")
    stack: Union[bool, str] = _opt("auto", choices=[True, False, "auto"], help="lockstep, one process: train the members of one width (seeds, lrs) as one batched model; true (on) = every width that can, false (off) = none, auto = the widths where one member's micro-batch rows (tokens) x width <= 32768, the break-even measured on CPU")


@dataclass
class StatsConfig:
    every: int = _opt(50, min=1, help="probe evaluation cadence in steps")
    enabled: bool = _opt(True, help="evaluate the probe split and write signatures")
    reference_run: str = _opt("", help="run directory whose signatures are the reference")
    signature_points: int = _opt(4096, min=1, help="probe points (examples or tokens, strided) stored per signature")
    sketch_dim: int = _opt(16, min=1, help="dimension k of the random projection of centered logits")
    sketch_seed: int = _opt(0, help="seed of the logit projection (keep it equal across compared runs)")
    kernel_points: int = _opt(128, min=0, help="probe points of the feature kernels Φ (P×P per layer); 0 = off")
    preact: bool = _opt(True, help="accumulate preactivation moments and histograms over training batches")
    preact_every: int = _opt(1, min=1, help="accumulate preactivations on every k-th training step")
    hist_bins: int = _opt(64, min=2, help="preactivation histogram bins")
    hist_stride: int = _opt(16, min=1, help="torch and native paths: histogram every k-th preactivation element (moments use all; the fused Triton kernel reads all)")
    hist_range: float = _opt(0.0, min=0.0, help="preactivation histograms span [-hist_range, hist_range], outside in the edge bins; 0 = per layer from the reference width's first evaluation (quantiles, saved with the run)")
    hist_quantile: float = _opt(0.001, min=0.0, help="hist_range 0: a layer's range is its [q, 1-q] quantiles at the first evaluation, widened by hist_margin; outside goes to two overflow bins")
    hist_margin: float = _opt(1.0, min=0.0, help="hist_range 0: widen each side of the quantile range by this fraction of its span (preactivations grow in training)")
    eval_batch: int = _opt(256, min=1, help="probe examples per forward when evaluating (the evaluation micro-batch: peak activation memory is one such forward)")
    bootstrap: int = _opt(1000, min=0, help="bootstrap resamples over seeds for the intervals of every fitted slope (needs >= 3 seeds); 0 = off")
    ensemble_every: int = _opt(0, min=0, help="language models: ensemble probe losses L(E) cadence in steps (at evaluations); 0 = final evaluation only")
    sharpness_iters: int = _opt(10, min=0, help="power iterations for the top Hessian eigenvalue; 0 = off")
    sharpness_every: int = _opt(0, min=0, help="sharpness cadence in steps (at evaluations); 0 = final evaluation only")
    sharpness_points: int = _opt(256, min=1, help="probe points in the sharpness loss (examples, or tokens rounded up to whole sequences)")
    hvp: str = _opt("auto", choices=["auto", "double", "fd"], help="Hessian-vector products: double backward, finite differences, or double with fd fallback")
    batch_sharpness_every: int = _opt(0, min=0, help="sharpness trajectory on the current training batch (full batch: the batch) every k steps and at init, by Lanczos; 0 = off")
    batch_sharpness_iters: int = _opt(20, min=1, help="Lanczos iterations (Hessian-vector products) per batch-sharpness point")
    coord_every: int = _opt(0, min=0, help="refined coordinate check (own-update and input-change parts of each layer's activation change) every k steps; 0 = off")
    ntk_points: int = _opt(16, min=0, help="probe points of the eNTK (scalar output); 0 = off")
    ntk_every: int = _opt(0, min=0, help="eNTK cadence in steps (at evaluations); 0 = final evaluation only")
    ntk_kernel: str = _opt("lr", choices=["lr", "raw", "adam"], help="eNTK J·D·Jᵀ: D = per-group learning rates (the kernel that drives training), identity (raw JJᵀ), or Adam's preconditioner")
    ntk_max_mb: int = _opt(256, min=0, help="stack per-point gradients (exact eNTK) up to this size, else finite-difference JVPs with gradients made in chunks of this size")
    ntk_top_k: int = _opt(16, min=1, help="eNTK eigenvectors stored per member and evaluation (signatures/<member>/ntk_step_*.safetensors, with the kernel); principal angles across widths use them")
    ntk_output: str = _opt("class", choices=["class", "trace"], help="eNTK output: the centered logit of the most frequent class (one kernel), or the trace kernel Σ_c K_c over every class's centered logit (C× the cost; classifiers only)")


@dataclass
class DistConfig:
    backend: str = _opt("none", choices=["none", "ddp", "fsdp2", "deepspeed"], help="sharding / data-parallel engine")
    zero_stage: int = _opt(0, min=0, help="deepspeed ZeRO stage 0-3")
    deepspeed: dict = _opt({}, help="passthrough merged into the generated DeepSpeed config")
    offload_optimizer: bool = _opt(False, help="deepspeed: optimizer state (and fp32 master) in CPU memory")
    offload_params: bool = _opt(False, help="deepspeed ZeRO-3 / fsdp2: parameters in CPU memory between uses")
    mixed_precision: str = _opt("none", choices=["none", "bf16"], help="fsdp2: bf16 compute copies of fp32 shards (reduce in fp32); deepspeed: bf16 engine")
    timeout_s: int = _opt(600, min=1, help="seconds a collective waits before a lost rank is reported")
    world_size: int = _opt(0, min=0, help="`fastwidth plan` only: ranks to plan for; 0 = 1 (training takes it from the launcher)")
    gpu_memory_gb: float = _opt(141.0, min=0.0, help="`fastwidth plan` only: memory of one accelerator (H200: 141)")
    shard_min_width: int = _opt(0, min=0, help="widths below this train under ddp, the rest under dist.backend (fsdp2 / deepspeed); 0 = all under dist.backend")
    replicate: int = _opt(0, min=-1, help="fsdp2: HSDP with this many replica groups (a 2-D mesh: sharded within a group, replicated across); -1 = one per node (shard within a node); 0 = plain FSDP")
    ignore_plan: bool = _opt(False, help="train even when the planner says the sweep does not fit the device")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    param: ParamConfig = field(default_factory=ParamConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    name: str = "run"  # config file stem; names the default run directory

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def _check_meta(f: dataclasses.Field, value: Any, where: str) -> None:
    choices, lo = f.metadata.get("choices"), f.metadata.get("min")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    if lo is not None and value is not None and value < lo:
        raise ConfigError(f"{where}: {value!r} is below the minimum {lo}")


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
    for lr in cfg.sweep.lrs:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"sweep.lrs: every entry must be a positive number, got {lr!r}")
    if len(set(cfg.sweep.lrs)) != len(cfg.sweep.lrs):
        raise ConfigError(f"sweep.lrs has duplicates: {cfg.sweep.lrs}")
    for w in cfg.sweep.widths:
        if w < 1:
            raise ConfigError(f"sweep.widths: width {w} must be positive")
    widths = cfg.sweep.widths or [m.width]
    if m.arch == "gpt":
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
        if m.act == "relu":
            raise ConfigError("model.act: relu is for mlp/resnet; gpt takes gelu or swiglu")
    if m.arch != "gpt" and m.act == "swiglu":
        raise ConfigError(f"model.act: swiglu is for gpt; {m.arch} takes relu or gelu")
    if len(cfg.optim.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas!r}")
    if cfg.sweep.reference_width and cfg.sweep.reference_width not in widths:
        raise ConfigError(f"sweep.reference_width {cfg.sweep.reference_width} is not in the widths {widths}")
    if len(set(widths)) != len(widths):
        raise ConfigError(f"sweep.widths has duplicates: {widths}")
    if len(set(cfg.sweep.seeds)) != len(cfg.sweep.seeds):
        raise ConfigError(f"sweep.seeds has duplicates: {cfg.sweep.seeds}")
    if cfg.dist.backend != "none" and (cfg.train.loss != "ce" or cfg.optim.lr_unit != "absolute"):
        raise ConfigError(f"train.loss={cfg.train.loss} / optim.lr_unit={cfg.optim.lr_unit} need dist.backend none")
    if cfg.dist.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"dist.zero_stage: {cfg.dist.zero_stage} is not one of 0, 1, 2, 3")
    if not 0.0 <= cfg.data.holdout_fraction < 1.0:
        raise ConfigError(f"data.holdout_fraction: {cfg.data.holdout_fraction} must be in [0, 1)")
    if not 0.0 <= cfg.data.label_noise <= 1.0:
        raise ConfigError(f"data.label_noise: {cfg.data.label_noise} must be in [0, 1]")
    if cfg.stats.ntk_output == "trace" and m.arch == "gpt":
        raise ConfigError("stats.ntk_output=trace is for classifiers (mlp, resnet): a gpt's vocabulary makes it "
                          "V× the cost; use stats.ntk_output=class")
    if cfg.param.attn_mult is not None and not (cfg.param.attn_mult > 0 and math.isfinite(cfg.param.attn_mult)):
        raise ConfigError(f"param.attn_mult: {cfg.param.attn_mult} must be a positive number or null")


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
