"""The training loop: every (width, seed) model of a sweep on one identical online stream.

    run_dir = run(load_config("configs/demo.yaml"))

lockstep: each step's batch is drawn once and every model takes its optimizer step on it.
sequential: one model after another, each reading the same stream from step 0. Either way a
model's init seed (sweep.seeds) and the data order (data.seed) are independent.

Everything that can be wrong with the input (config, data, checkpoint, run directory) is checked
before the first byte is written to the run directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from tqdm import tqdm

from fastwidth.config import Config, dump_yaml, for_width, resolve
from fastwidth.data import build_stream
from fastwidth.parallel import checkpoint as par_ckpt
from fastwidth.parallel import stats as par_stats
from fastwidth.parallel.engines import build_engine
from fastwidth.parallel.env import init_dist
from fastwidth.errors import CheckpointError, DataError, UserError
from fastwidth.kernels import dispatch
from fastwidth.models import build_meta, build_model
from fastwidth.param.optim import build_optimizer, lr_factor, set_lr
from fastwidth.param.scaling import ParamInfo, mup_table, table_rows
from fastwidth.stats.monitor import Monitor
from fastwidth.train import checkpoint as ckpt
from fastwidth.train.metrics import MetricsWriter, truncate_after

log = logging.getLogger("fastwidth.train")

# Keys that may change between a checkpoint and the command that resumes it.
RESUMABLE_CHANGES = {"train.steps", "train.out_dir", "train.resume", "train.overwrite", "train.progress", "train.log_every",
                     "train.ckpt_every", "train.keep_checkpoints", "train.threads", "train.device",
                     "stats.every", "stats.enabled", "stats.reference_run", "stats.eval_batch", "stats.bootstrap", "stats.ensemble_every",
                     "stats.sharpness_iters", "stats.sharpness_every", "stats.sharpness_points", "stats.hvp",
                     "stats.ntk_points", "stats.ntk_every", "stats.ntk_max_mb"}


@dataclass
class Member:
    """One model of the sweep and everything that trains it."""

    width: int
    seed: int
    cfg: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    table: dict[str, ParamInfo]
    step: int = 0

    @property
    def name(self) -> str:
        return f"w{self.width}_s{self.seed}"


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is visible; use auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(cfg: Config, device: torch.device):
    """bf16 autocast on GPU (precision auto or bf16), fp32 on CPU unless bf16 is asked for."""
    p = cfg.train.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def data_io(stream, cfg: Config) -> SimpleNamespace:
    """What a model needs to know about the data."""
    return SimpleNamespace(kind=stream.kind, vocab_size=getattr(stream, "vocab_size", None),
                           seq_len=cfg.data.seq_len, in_shape=getattr(stream, "in_shape", None),
                           num_classes=getattr(stream, "num_classes", None))


def tokens_per_step(stream, cfg: Config) -> int:
    """Targets per optimizer step: tokens for text, examples for classification."""
    return cfg.data.batch_size * (cfg.data.seq_len if stream.kind == "tokens" else 1)


def make_members(cfg: Config, stream, device: torch.device, engine=None) -> list[Member]:
    """Models of every (width, seed), the reference width first (sequential mode needs it).
    Under a distributed engine each member is built on meta and handed to engine.wrap."""
    io = data_io(stream, cfg)
    ref = cfg.sweep.reference_width
    widths = [ref] + [w for w in cfg.sweep.widths if w != ref]
    members = []
    for w in widths:
        wcfg = for_width(cfg, w)
        for s in cfg.sweep.seeds:
            if engine is not None:
                meta = build_meta(wcfg, io)
                table = mup_table(meta, wcfg)  # global shapes, before any sharding
                model, opt = engine.wrap(f"w{w}_s{s}", meta, table, wcfg, s)
                members.append(Member(w, s, wcfg, model, opt, table))
                continue
            model, table = build_model(wcfg, io, device=device, seed=s)
            members.append(Member(w, s, wcfg, model, build_optimizer(model, table, wcfg), table))
    return members


# --------------------------------------------------------------------------- run directory

def _config_diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        key = f"{prefix}{k}"
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, key + ".")
        elif a != b and key not in RESUMABLE_CHANGES and key != "name":
            out.append(key)
    return out


def check_run_dir(cfg: Config) -> dict | None:
    """Validate the run directory for a fresh start or a resume; returns the checkpoint to resume."""
    run_dir = Path(cfg.train.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.out_dir {run_dir} exists and is not a directory")
    has_run = (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()
    if not cfg.train.resume:
        if has_run and not cfg.train.overwrite:
            raise UserError(f"run directory {run_dir} already holds a run; set train.resume=true to continue "
                            f"it or train.overwrite=true to replace it")
        return None
    found = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if found is None:
        raise CheckpointError(f"train.resume is set but {run_dir / 'checkpoints'} holds no checkpoint")
    meta = ckpt.read_checkpoint(found)
    diff = _config_diff(meta.get("config", {}), cfg.to_dict())
    if diff:
        raise CheckpointError(f"checkpoint {found} was made with a different config: {', '.join(diff[:4])} differ")
    if meta["step"] > cfg.train.steps:
        raise CheckpointError(f"checkpoint {found} is at step {meta['step']}, past train.steps={cfg.train.steps}")
    return meta


def prepare_run_dir(cfg: Config, meta: dict | None) -> Path:
    run_dir = Path(cfg.train.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if meta is None and cfg.train.overwrite:
        for sub in ("checkpoints", "signatures", "report"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    for sub in ("checkpoints", "signatures", "report"):
        (run_dir / sub).mkdir(exist_ok=True)
    if meta is not None:
        truncate_after(run_dir / "metrics.jsonl", {(e["width"], e["seed"]): e["step"] for e in meta["members"]})
    ckpt.atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    return run_dir


# --------------------------------------------------------------------------- the loop

class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg = resolve(cfg)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.train.device)
        dispatch.set_backend(cfg.train.kernels)
        self.dist = init_dist(cfg)  # rank 0 of 1 without an engine
        if self.dist.active:
            self.device = self.dist.device
        self.engine = build_engine(cfg, self.dist)
        par_stats.check_sharded_stats(cfg, self.engine)
        self.stream = build_stream(cfg.data, rank=self.dist.rank, world_size=self.dist.world_size)
        if self.stream.steps_available < cfg.train.steps:
            raise DataError(f"data: {cfg.data.source} holds {self.stream.steps_available} steps of "
                            f"data.batch_size={cfg.data.batch_size} in data.epochs={cfg.data.epochs}, "
                            f"train.steps={cfg.train.steps} asks for more")
        self.resume_meta = check_run_dir(cfg)
        self.dist.barrier()  # every rank has read the run directory before rank 0 writes to it
        self.members = make_members(cfg, self.stream, self.device, self.engine)
        if self.resume_meta is not None:
            if self.dist.active or "engine" in self.resume_meta:
                par_ckpt.restore(self.engine, self.dist, self.members, self.resume_meta,
                                  ckpt.latest_checkpoint(Path(cfg.train.out_dir) / "checkpoints"))
            else:
                for m in self.members:
                    ckpt.restore_member(m, self.resume_meta)
            self.stream.load_state_dict(self.resume_meta["data"])
            ckpt.set_rng_state(self.resume_meta["rng"])
        if self.dist.is_main:
            self.run_dir = prepare_run_dir(cfg, self.resume_meta)
        else:  # other ranks evaluate too (collective forwards) but write into a scratch copy
            self.run_dir = Path(cfg.train.out_dir) / f".rank{self.dist.rank}"
            shutil.rmtree(self.run_dir, ignore_errors=True)
            for sub in ("checkpoints", "signatures", "report"):
                (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        self.writer = MetricsWriter(self.run_dir / "metrics.jsonl")
        self.tokens_per_step = tokens_per_step(self.stream, cfg)
        self.evaluator = Monitor(cfg, self.run_dir, self.members, self.stream.probe(), self.writer, self.device)
        if self.dist.world_size > 1:  # each rank evaluates its slice of the probe; all get the whole signature
            rank, world = self.dist.rank, self.dist.world_size
            self.evaluator.probe_fn = lambda model, spec, device, feats: par_stats.probe_signature_sharded(
                model, spec, device, rank, world, feats)
        if self.resume_meta is not None and "stats" in self.resume_meta:
            self.evaluator.load_state_dict(self.resume_meta["stats"])
            par_stats.keep_on_main(self.evaluator, self.dist.rank)  # the saved summary is rank 0's, global

    # one optimizer step of one member on one batch; returns the loss (a tensor, no host sync)
    def train_step(self, m: Member, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        oc = self.cfg.optim
        set_lr(m.optimizer, oc, m.step, self.cfg.train.steps)
        m.model.train()
        hooks = self.evaluator.training(m) if self.cfg.stats.enabled else contextlib.nullcontext()
        with hooks, autocast_for(self.cfg, self.device):
            loss = m.model.loss(x, y) if self.engine is None else self.engine.loss(m.name, x, y)
        if self.engine is not None:  # backward, clip, step, zero; the logged loss is the global mean
            self.engine.step(m.name, loss)
            m.step += 1
            return self.dist.mean(loss.detach())
        loss.backward()
        if oc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(m.model.parameters(), oc.grad_clip)
        m.optimizer.step()
        m.optimizer.zero_grad(set_to_none=True)
        m.step += 1
        return loss.detach()

    def batch(self, step: int):
        b = self.stream.batch(step)
        return b["x"].to(self.device, non_blocking=True), b["y"].to(self.device, non_blocking=True)

    def log_train(self, m: Member, loss: torch.Tensor, lr_factor_: float) -> None:
        self.writer.write({"kind": "train", "step": m.step, "tokens": m.step * self.tokens_per_step,
                           "width": m.width, "seed": m.seed, "loss": float(loss), "lr": self.cfg.optim.lr * lr_factor_})

    def _due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.cfg.train.steps

    def run(self) -> Path:
        cfg = self.cfg
        start = min(m.step for m in self.members)
        self.record_data(start)
        if start == 0 and cfg.stats.enabled:
            self.evaluator.evaluate(0, 0, self.members)
        bar = tqdm(total=cfg.train.steps * len(self.members), initial=sum(m.step for m in self.members),
                   desc=f"{cfg.name} {len(self.members)} models", unit="step", disable=not cfg.train.progress,
                   file=sys.stderr, dynamic_ncols=True)
        groups = [self.members] if cfg.sweep.mode == "lockstep" else [[m] for m in self.members]
        t0 = time.time()
        for group in groups:
            while min(m.step for m in group) < cfg.train.steps:
                step = min(m.step for m in group)
                x, y = self.batch(step)
                losses = {}
                for m in group:
                    if m.step == step:
                        losses[m.name] = self.train_step(m, x, y)
                bar.update(len(losses))
                self.dist.maybe_die(step + 1)
                self._after_step(step + 1, group, losses, bar)
            if cfg.sweep.mode == "sequential" and cfg.stats.enabled:
                self.evaluator.flush_pending()
        bar.close()
        self.save(final=True)
        self.writer.write({"kind": "run", "step": cfg.train.steps, "tokens": cfg.train.steps * self.tokens_per_step,
                           "width": 0, "seed": 0, "wall_s": time.time() - t0, "models": len(self.members),
                           "commit": source_commit()})
        self.writer.close()
        if not self.dist.is_main:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return Path(cfg.train.out_dir) if self.dist.active else self.run_dir

    def record_data(self, step: int) -> None:
        """The stream's fingerprint in metrics.jsonl and the probe split beside the run, so a
        reference run and this one can be checked to share source, split and probe."""
        if not self.dist.is_main:
            return
        info = json.loads(json.dumps(self.stream.describe(), default=str))
        self.writer.write({"kind": "data", "step": step, "tokens": step * self.tokens_per_step, "width": 0,
                           "seed": 0, **info})
        probe_file = self.run_dir / "probe.safetensors"
        if not probe_file.exists():
            self.stream.save_probe(probe_file)

    def _after_step(self, step: int, group: list[Member], losses: dict, bar) -> None:
        cfg = self.cfg
        if self._due(step, cfg.train.log_every):
            f = lr_factor(step - 1, cfg.optim, cfg.train.steps)
            for m in group:
                if m.name in losses:
                    self.log_train(m, losses[m.name], f)
            ref = losses.get(group[0].name)
            if ref is not None:
                bar.set_postfix({group[0].name: f"{float(ref):.3f}"}, refresh=False)
        if cfg.stats.enabled and self._due(step, cfg.stats.every):
            par_stats.sync_monitor(self.evaluator, group, self.dist.world_size)  # whole-batch preact stats
            self.evaluator.evaluate(step, step * self.tokens_per_step, group)
        if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and step < cfg.train.steps:
            self.save(final=False)

    def save(self, final: bool) -> Path:
        step = min(m.step for m in self.members)
        par_stats.sync_monitor(self.evaluator, self.members, self.dist.world_size)
        extra = {"config": self.cfg.to_dict(), "data": self.stream.state_dict(), "rng": ckpt.rng_state(),
                 "mup_tables": {m.name: table_rows(m.table) for m in self.members},
                 "stats": self.evaluator.state_dict(), "final": final}
        if self.engine is not None:
            return par_ckpt.save(self.engine, self.dist, Path(self.cfg.train.out_dir) / "checkpoints", step,
                                  self.members, extra, keep=self.cfg.train.keep_checkpoints)
        return ckpt.save_checkpoint(self.run_dir / "checkpoints", step, self.members, extra,
                                    keep=self.cfg.train.keep_checkpoints)


def source_commit() -> str | None:
    """The git commit of the fastwidth source that ran (with "-dirty" for uncommitted changes), or None."""
    import subprocess
    src = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run(cfg: Config) -> Path:
    """Train the sweep `cfg` describes; returns the run directory."""
    if cfg.dist.backend == "none":
        return Trainer(cfg).run()
    trainer = None
    try:
        trainer = Trainer(cfg)
        with trainer.dist.guard("training"):
            return trainer.run()
    finally:
        if trainer is not None:
            trainer.dist.close()
