"""The run directory at the start of a run: is there a run to resume, and making (or, resuming,
trimming) it. Runs inside the lock and undo_on_error of run/lock.py:

    meta = check_run_dir(cfg)                          # the checkpoint a resume starts from, or None
    prepare_run_dir(cfg, meta, member_steps, floors)   # rank 0: made or trimmed; config.yaml written
    make_scratch_dir(cfg.train.out_dir, rank)          # the other ranks: their emptied scratch copy
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from fastwidth.config import Config, dump_yaml
from fastwidth.errors import CheckpointError, ConfigError, UserError
from fastwidth.run import checkpoint as ckpt
from fastwidth.run.lock import make_dir
from fastwidth.run.metrics import truncate_after
from fastwidth.run.paths import RunDir

log = logging.getLogger("fastwidth.run")

# Keys that may change between a checkpoint and the command that resumes it.
RESUMABLE_CHANGES = {"data.micro_batch_size", "train.activation_checkpointing",  # memory tools: same trajectory
                     "train.steps", "train.out_dir", "train.resume", "train.overwrite", "train.progress", "train.log_every",
                     "train.compile", "sweep.stack",
                     "train.ckpt_every", "train.ckpt_minutes", "train.report", "train.tensorboard", "train.csv", "train.keep_checkpoints", "train.threads", "train.device",
                     "stats.every", "stats.schedule", "stats.evals", "stats.enabled", "stats.reference_run", "stats.eval_batch", "stats.bootstrap", "stats.ensemble_every",
                     "stats.sharpness_iters", "stats.sharpness_every", "stats.sharpness_points", "stats.sharpness_tol", "stats.hvp",
                     "stats.ntk_points", "stats.ntk_every", "stats.ntk_max_mb", "stats.ntk_top_k",
                     "stats.batch_sharpness_every", "stats.batch_sharpness_dense", "stats.batch_sharpness_iters",
                     "stats.coord_every"}
RESUMABLE_CHANGES |= {"train.trust_checkpoint"}  # whom to trust is the resuming command's choice


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


# Sources that read every file under data.path (a directory tree): a run directory inside it
# would put the run's own rows, signatures and checkpoints into its corpus at the next start.
TREE_SOURCES = ("text", "imagefolder")


def check_outside_data(cfg: Config) -> None:
    """ConfigError when train.out_dir is data.path or inside it (sources that read a directory tree);
    run before the run directory is made (the corpus would read its lock file)."""
    if cfg.data.source not in TREE_SOURCES or not cfg.data.path:
        return
    data = Path(cfg.data.path).expanduser().resolve()
    out = Path(cfg.train.out_dir).expanduser().resolve()
    if out == data or data in out.parents:
        raise ConfigError(f"train.out_dir {cfg.train.out_dir} is inside data.path {cfg.data.path}: the run's own "
                          f"files would join its corpus; put the run directory outside the data")


def check_run_dir(cfg: Config) -> dict | None:
    """Validate the run directory for a fresh start or a resume; returns the checkpoint to resume."""
    run_dir = Path(cfg.train.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.out_dir {run_dir} exists and is not a directory")
    run = RunDir(run_dir)
    # a run is what can be resumed: a directory whose run stopped before its first checkpoint
    # (kill -9, a second Ctrl-C) starts over with the same command
    has_run = ckpt.latest_checkpoint(run.checkpoints) is not None
    if not has_run and run.metrics.exists() and not cfg.train.resume:
        log.warning("run directory %s holds a run stopped before its first checkpoint: starting it over", run_dir)
    if cfg.train.resume == "auto":  # a requeued job: resume when a checkpoint exists, else start over
        if ckpt.latest_checkpoint(run.checkpoints) is None:
            return None
    elif not cfg.train.resume:
        if has_run and not cfg.train.overwrite:
            raise UserError(f"run directory {run_dir} already holds a run; set train.resume=true to continue "
                            f"it or train.overwrite=true to replace it")
        return None
    found = ckpt.latest_checkpoint(run.checkpoints)
    if found is None:
        raise CheckpointError(f"train.resume is set but {run.checkpoints} holds no checkpoint; "
                              f"without train.resume (or with train.resume=auto) the run starts over")
    meta = ckpt.read_checkpoint(found, trust=cfg.train.trust_checkpoint)
    diff = _config_diff(meta.get("config", {}), cfg.to_dict())
    if diff:
        raise CheckpointError(f"checkpoint {found} was made with a different config: {', '.join(diff[:4])} differ")
    if meta["step"] > cfg.train.steps:
        raise CheckpointError(f"checkpoint {found} is at step {meta['step']}, past train.steps={cfg.train.steps}")
    return meta


def prepare_run_dir(cfg: Config, meta: dict | None, member_steps: dict | None = None,
                    floors: dict | None = None) -> Path:
    """Create (or, resuming, trim) the run directory; member_steps maps (width, seed, base_lr) to the
    step each member resumes from (rows after it are dropped); floors: the step at which the rows of
    no member are cut, per `pass` (metrics.truncate_after)."""
    run = RunDir(cfg.train.out_dir)
    make_dir(run.root)
    if meta is None:  # overwrite, resume=auto without a checkpoint, or nothing resumable: start over
        for sub in run.subdirs:
            shutil.rmtree(sub, ignore_errors=True)
        run.metrics.unlink(missing_ok=True)
        run.ranges.unlink(missing_ok=True)  # the old run's histogram bins: this run sets its own
    for sub in run.subdirs:
        sub.mkdir(exist_ok=True)
    if meta is not None and not run.metrics.is_file():
        _note_history_lost(run, meta["step"])
    elif meta is not None:
        truncate_after(run.metrics, member_steps
                       or {(e["width"], e["seed"], None): e["step"] for e in meta["members"]}, floors)
    ckpt.atomic_write_text(run.config, dump_yaml(cfg))
    return run.root


def _note_history_lost(run: RunDir, step: int) -> None:
    """A resume whose metrics.jsonl is gone: one warning, and a first row saying the history before
    `step` is lost, so the report says where its history starts instead of drawing a partial one."""
    log.warning("%s is gone: the history before step %d is lost; its rows start over from the checkpoint's "
                "step %d", run.metrics, step, step)
    ckpt.atomic_write_text(run.metrics, json.dumps({"kind": "history_lost", "step": step, "tokens": None,
                                                    "width": 0, "seed": 0}) + "\n")


def make_scratch_dir(out_dir: str | Path, rank: int) -> Path:
    """Rank `rank`'s scratch run directory (ranks other than 0 evaluate too, collective forwards,
    but write here): emptied, with the layout's subdirectories made."""
    scratch = RunDir(out_dir).scratch(rank)
    shutil.rmtree(scratch.root, ignore_errors=True)
    for sub in scratch.subdirs:
        sub.mkdir(parents=True, exist_ok=True)
    return scratch.root
