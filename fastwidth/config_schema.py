"""The config tree's schema: one dataclass a section (model, param, optim, data, train, sweep,
stats, dist) and the Config holding them, each field with its default, its `choices` / `min`
checked on load and a one-line help for the README's reference.

config.py reads YAML and `--set` overrides into these, validates and resolves them, and
re-exports every name here: import them from fastwidth.config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union


# Seeds: a signed 64-bit integer, what every generator fastwidth seeds takes (torch.Generator.manual_seed
# refuses past [-2^63, 2^64 - 1]: "Overflow when unpacking long long"; numpy's SeedSequence and the
# sha256-derived init seeds take any integer). The member seed goes to torch unchanged (the sharpness
# start vector, stats/sharpness.py), so a 2^64 seed used to train every step and crash at the end.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1


def _opt(default, *, choices=None, min=None, max=None, above=None, below=None, help=""):
    """A dataclass field carrying validation metadata (and a one-line help for the README): min / max
    are inclusive bounds, above / below exclusive ones. Every float is also refused when not finite."""
    meta = {"choices": choices, "min": min, "max": max, "above": above, "below": below, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    arch: str = _opt("gpt", choices=["gpt", "mlp", "resnet", "python", "hf"], help="model family: fastwidth's own (gpt, mlp, resnet), a user's module family (python: model.factory), or a Hugging Face one (hf: model.hf)")
    width: int = _opt(128, min=1, help="hidden width N (gpt: d_model; mlp: hidden units; resnet: first-stage channels)")
    depth: int = _opt(2, min=1, help="gpt: blocks; mlp: hidden layers; resnet: blocks per stage")
    head_dim: int = _opt(32, min=1, help="gpt: per-head dimension when n_heads is 0 (n_heads = width / head_dim)")
    n_heads: int = _opt(0, min=0, help="gpt: fixed head count (head_dim = width / n_heads); 0 = width / head_dim")
    mlp_ratio: int = _opt(4, min=1, help="gpt: MLP hidden size = mlp_ratio * width")
    norm: str = _opt("rms", choices=["rms", "layer"], help="gpt: RMSNorm or LayerNorm (pre-norm)")
    act: str = _opt("auto", choices=["auto", "gelu", "swiglu", "relu"], help="activation; auto = gelu (gpt), relu (mlp, resnet)")
    rope_base: float = _opt(10000.0, min=1.0, help="gpt: RoPE base")
    bias: bool = _opt(False, help="gpt: biases in linear layers (mlp and resnet readouts always have one)")
    qk_norm: bool = _opt(False, help="gpt: RMS-normalize each head's queries and keys (with gains) before RoPE and the softmax")
    n_kv_heads: int = _opt(0, min=0, help="gpt: key/value heads at param.base_width (grouped-query attention; must divide the query heads there; the group size is kept at every width); 0 = as many as query heads")
    factory: str = _opt("", help="python: \"package.module:function\" whose function(width) or function(width, depth) returns the nn.Module (inputs to logits) at that width; fastwidth.train(config, model=make) sets it")
    hf: dict = _opt({}, help="hf: {model_type: llama | qwen2 | gpt_neox, ...}: the transformers config at each width (hidden size = model.width, intermediate = model.mlp_ratio × width, heads by model.head_dim or model.n_heads, kv heads model.n_kv_heads, layers model.depth); other keys pass through to the config")
    tie_embeddings: bool = _opt(False, help="gpt: the readout uses the token embedding's matrix (µP: the readout's forward multiplier on the output use only, as mup's MuSharedReadout)")


@dataclass
class ParamConfig:
    kind: str = _opt("mup", choices=["mup", "sp", "ntk", "mean_field", "depth_mup", "completep", "umup"], help="parameterization (README: the µP table; depth_mup and completep scale residual branches by (depth / base_depth)^-α; umup is u-µP where its rules fit the table)")
    base_width: int = _opt(64, min=1, help="width at which every kind equals sp; m = width / base_width")
    base_depth: int = _opt(2, min=1, help="depth at which depth_mup and completep equal mup; m_L = depth / base_depth")
    depth_alpha: Optional[float] = _opt(None, min=0.0, max=1.0, help="residual branch exponent α (branch output × m_L^-α); null = the kind's own (depth_mup 0.5, completep 1)")
    gamma0: float = _opt(1.0, min=1e-12, help="mean_field richness γ0 (output ÷γ0, LR ×γ0 Adam / ×γ0² SGD)")
    output_mult: float = _opt(1.0, help="readout forward multiplier α (µP: α / m)")
    attn_mult: Optional[float] = _opt(None, above=0.0, help="attention logits scale attn_mult / head_dim; null = sqrt(base head_dim) (umup: 1)")
    init: str = _opt("normal", choices=["normal", "torch"], help="normal = N(0, σ²/fan_in), biases 0 (the default: earlier runs keep their numbers; √3 × PyTorch's std); torch = PyTorch's default init through the µP table, as mup's set_base_shapes leaves it (matrices U(±σ/√fan_in), biases U(±1/√fan_in)), so mup users' hyperparameters carry over")
    init_std: float = _opt(1.0, min=0.0, help="σ: matrices ~ N(0, σ² / fan_in) or, init=torch, U(±σ/√fan_in) (fan_in at base width for input/output)")
    embed_std: float = _opt(1.0, min=0.0, help="token embedding std (gpt)")
    zero_readout: bool = _opt(True, help="µP kinds but umup (unit init): zero-initialize the readout weight")
    zero_query: bool = _opt(False, help="µP kinds: zero-initialize the attention query weight")
    roles: dict = _opt({}, help="model.arch python / hf: {\"name-pattern\": \"role\" or \"role:init\"} overriding inferred µP roles (fnmatch patterns on parameter names; roles input, hidden, output, vector, fixed; inits fan_in, embed, bias, zeros, ones)")


@dataclass
class OptimConfig:
    name: str = _opt("adamw", choices=["adamw", "adam", "sgd"], help="optimizer")
    lr: float = _opt(1e-3, above=0.0, help="base learning rate η (per-group lr = η × lr_mult × schedule)")
    weight_decay: float = _opt(0.0, min=0.0, help="base weight decay (per-group wd = wd × wd_mult)")
    betas: list = _opt([0.9, 0.999], help="Adam betas")
    eps: float = _opt(1e-8, above=0.0, help="Adam epsilon (per group: eps × eps_mult, `fastwidth mup-table`)")
    eps_scaling: str = _opt("auto", choices=["auto", "none", "width"], help="Adam epsilon across width under the µP kinds: width = eps × base_width / width (Everett et al. 2024; nanoGPT-mup), none = one eps; auto = width under depth_mup, completep and umup, none under the others")
    weight_decay_mode: str = _opt("coupled", choices=["coupled", "independent"], help="coupled: the per-step decay is lr × weight_decay × wd_mult (torch's AdamW); independent (adamw only): weight_decay × schedule, not riding on the LR and with no width factor (unit scaling, u-µP)")
    momentum: float = _opt(0.0, min=0.0, below=1.0, help="SGD momentum")
    grad_clip: float = _opt(1.0, min=0.0, help="global gradient-norm clip per model; 0 = off. Not part of µP: the norm it clips grows or shrinks with width, so a clip acts differently per width (comparisons across widths or parameterizations state it, usually 0)")
    schedule: str = _opt("constant", choices=["constant", "linear", "cosine"], help="LR schedule after warmup")
    warmup_steps: int = _opt(0, min=0, help="linear warmup steps")
    decay_steps: int = _opt(0, min=0, help="horizon of linear/cosine decay; 0 = train.steps (set it to extend a run by resuming)")
    min_lr_ratio: float = _opt(0.0, min=0.0, max=1.0, help="final LR as a fraction of the peak for linear/cosine")
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
    max_undecodable: float = _opt(0.01, min=0.0, max=1.0, help="text: refuse a corpus file whose share of bytes that are not UTF-8 (in its first 256 KB) exceeds this; 1 = accept anything (bytes are decoded with replacement)")
    allow_missing_classes: bool = _opt(False, help="classifiers: train even when the training labels hold fewer than data.num_classes classes (the readout, probe metrics and eNTK class assume all of them)")
    train_size: int = _opt(0, min=0, help="offline training: a fixed subset of this many training examples (token windows for text), the first ones of the online order, cycled in one fixed order identical for every member; evaluations add its loss (train_subset_loss) beside the probe loss. With train_size >= steps x batch_size the run equals the online one bit for bit; 0 = online (the whole split)")


@dataclass
class TrainConfig:
    steps: int = _opt(100, min=0, help="optimizer steps")
    out_dir: str = _opt("", help="run directory; empty = runs/<config name>-<UTC time>")
    seed: int = _opt(0, help="init seed of a single model (sweep.seeds overrides)")
    resume: Union[bool, str] = _opt(False, choices=[False, True, "auto"],
                                    help="continue from the latest checkpoint in out_dir; auto = resume when one exists, else start fresh (requeued jobs)")
    overwrite: bool = _opt(False, help="allow starting fresh in a run directory that already holds a run")
    trust_checkpoint: bool = _opt(False, help="resume from a checkpoint holding files that need unpickling (one written by an earlier fastwidth, or a DeepSpeed one): only if you trust who wrote it, since unpickling can run code")
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
    wandb: bool = _opt(False, help="also log the metrics rows (one W&B run per member, grouped by the run) and the report's figures to Weights & Biases; WANDB_MODE=offline works without a network; refused at start without the wandb package")
    wandb_project: str = _opt("fastwidth", help="the W&B project of train.wandb")
    z_loss: float = _opt(0.0, min=0.0, help="add z_loss × mean(logsumexp(logits)²) to the training loss (PaLM's z-loss); 0 = off")


@dataclass
class SweepConfig:
    widths: list = _opt([], help="widths trained on the same stream; empty = [model.width]")
    seeds: list = _opt([], help="init seeds per width; empty = [train.seed]")
    reference_width: int = _opt(0, min=0, help="width the others are compared with; 0 = the largest")
    depths: list = _opt([], help="depths trained on the same stream: every (width, depth, lr, seed) is a member; empty = [model.depth]")
    reference_depth: int = _opt(0, min=0, help="depth the others are compared with at the same width; 0 = the deepest")
    mode: str = _opt("lockstep", choices=["lockstep", "sequential"], help="all models per batch, or one after another")
    lrs: list = _opt([], help="base learning rates: every (width, lr, seed) is a member on the same batches; empty = [optim.lr]")
    lr_refine: int = _opt(0, min=0, help="after the sweep.lrs pass, train this many more learning rates around each width's best (its grid argmin, each neighbouring grid step cut into parts of at most x2^0.5) on the same stream and seeds, and fit the optima on the union grid; rows carry pass: refine; 0 = off")
    stack: Union[bool, str] = _opt("auto", choices=[True, False, "auto"], help="lockstep, one process: train the members of one width (seeds, lrs) as one batched model; true (on) = every width that can, false (off) = none, auto = the widths where one member's micro-batch rows (tokens) x width <= 32768, the break-even measured on CPU")


@dataclass
class StatsConfig:
    every: int = _opt(50, min=1, help="schedule linear: probe evaluation cadence in steps")
    schedule: str = _opt("linear", choices=["linear", "log"], help="probe evaluations: linear = every stats.every steps; log = stats.evals of them spaced evenly in log tokens, the first steps (1, 2, ...) and the last always among them (stats/schedule.py); both also evaluate at step 0")
    evals: int = _opt(24, min=2, help="schedule log: evaluations after step 0 (fewer when train.steps is smaller)")
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
    hist_range: float = _opt(0.0, min=0.0, help="preactivation histograms span [-hist_range, hist_range], outside in the edge bins; 0 = per layer from the reference width's first evaluation (hist_units: asinh or quantile bins, saved with the run)")
    hist_units: str = _opt("asinh", choices=["asinh", "raw"], help="hist_range 0: bin u = asinh((x - c) / s), c, s the reference width's probe mean and std at the first evaluation (covers the preactivations' growth in training; stats/preact_range.py), or raw x on quantile ranges")
    hist_reach: float = _opt(1000.0, min=1.0, help="hist_units asinh: the bins reach this many first-evaluation stds from the centre; beyond goes to two overflow bins")
    hist_quantile: float = _opt(0.001, min=0.0, below=0.5, help="hist_range 0, hist_units raw: a layer's range is its [q, 1-q] quantiles at the first evaluation, widened by hist_margin; outside goes to two overflow bins")
    hist_margin: float = _opt(1.0, min=0.0, help="hist_range 0, hist_units raw: widen each side of the quantile range by this fraction of its span (preactivations grow in training)")
    eval_batch: int = _opt(256, min=1, help="probe examples per forward when evaluating (the evaluation micro-batch: peak activation memory is one such forward)")
    bootstrap: int = _opt(1000, min=0, help="bootstrap resamples over seeds for the intervals of every fitted slope (needs >= 3 seeds); 0 = off")
    ensemble_every: int = _opt(0, min=0, help="language models: ensemble probe losses L(E) cadence in steps (at evaluations); 0 = final evaluation only")
    sharpness_iters: int = _opt(20, min=0, help="at most this many Lanczos iterations (Hessian-vector products) for the top Hessian eigenvalue on the training batch, at evaluations; 0 = off")
    sharpness_every: int = _opt(0, min=0, help="sharpness cadence in steps (at evaluations); 0 = final evaluation only")
    sharpness_points: int = _opt(256, min=1, help="training-batch examples in the sharpness loss at evaluations (tokens rounded up to whole sequences for token streams; the first ones of each rank's share; the whole batch when larger)")
    sharpness_tol: float = _opt(1e-2, min=0.0, help="Lanczos stops when the top Ritz pair's relative residual, norm(Hv - λv) / abs(λ), is at most this (sharpness, batch_sharpness and λ0; rows report converged and residual)")
    hvp: str = _opt("auto", choices=["auto", "double", "fd"], help="Hessian-vector products: double backward, finite differences, or double with fd fallback")
    batch_sharpness_every: int = _opt(0, min=0, help="sharpness trajectory on the current training batch (full batch: the batch) every k steps and at init, by Lanczos; 0 = off")
    batch_sharpness_dense: int = _opt(0, min=0, help="batch sharpness at every step up to this step as well (then at stats.batch_sharpness_every): edge-of-stability onsets and catapults resolved step by step; 0 = off")
    batch_sharpness_iters: int = _opt(20, min=1, help="at most this many Lanczos iterations (Hessian-vector products) per batch-sharpness point (stops earlier at stats.sharpness_tol)")
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
