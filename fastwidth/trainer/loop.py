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
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fastwidth.config import Config, resolve
from fastwidth.data import build_stream, data_io  # noqa: F401 (data_io: public here too)
from fastwidth.parallel.engines import StepContext
from fastwidth.parallel.env import agree_on_out_dir, check_shared_dir, init_dist, launched_world
from fastwidth.parallel.memory import MemoryRecorder
from fastwidth.parallel.placement import Placement
from fastwidth.parallel.plan import check_fits
from fastwidth.errors import DataError
from fastwidth.kernels import dispatch
from fastwidth.param.optim import lr_factor, set_lr, timescales
from fastwidth.stats.lr_groups import member_tags, monitor_for
from fastwidth.stats.reference import check_reference_run
from fastwidth.stats.schedule import EvalSchedule
from fastwidth.stats.training_rows import BatchSharpnessRows, CoordRows
from fastwidth.run.lock import RunLock, check_creatable, undo_on_error
from fastwidth.run.prepare import check_outside_data, check_run_dir, make_scratch_dir, prepare_run_dir
from fastwidth.run.paths import RunDir
from fastwidth.run.writes import writing
from fastwidth.trainer.checkpointer import RNG, Checkpointer, State, check_resumable
from fastwidth.trainer import flops, preempt, tracking
from fastwidth.trainer.faults import machine_faults
from fastwidth.run.metrics import read_metrics
from fastwidth.trainer import dynamics, stacked, sweep, threads
from fastwidth.trainer.members import (Member, autocast_for, compiled_loss,  # noqa: F401 (re-exported: bench/, tests)
                                     make_members, pick_device, tokens_per_step)

log = logging.getLogger("fastwidth.trainer")

# --------------------------------------------------------------------------- the loop

class Trainer:
    def __init__(self, cfg: Config, stop: preempt.StopFlag | None = None):
        self.cfg = cfg = resolve(cfg)
        self.stop = stop or preempt.StopFlag()  # entered by run(): SIGTERM/SIGUSR1 set it
        tracking.check_wandb(cfg.train)  # train.wandb without the package: one line, nothing built
        threads.set_threads(cfg.train.threads)  # auto: from the usable cores and the load
        self.device = pick_device(cfg.train.device)
        dispatch.set_backend(cfg.train.kernels)
        self.dist = init_dist(cfg)  # rank 0 of 1 without a process group
        if self.dist.active:
            self.device = self.dist.device
        else:
            self.dist.device = self.device  # the single-process Engine materializes there
        check_resumable(cfg, self.dist.world_size)  # one line from meta.json, before any engine
        self.placement = Placement(cfg, self.dist)  # the engine of every member's width, always one
        check_fits(cfg, self.dist, self.placement.k)  # one line and exit 2 when the planner says no
        self.stream = build_stream(cfg.data, rank=self.dist.rank, world_size=self.dist.world_size)
        if self.stream.steps_available < cfg.train.steps and not cfg.train.full_batch:
            raise DataError(f"data: {cfg.data.source} holds {self.stream.steps_available} steps of "
                            f"data.batch_size={cfg.data.batch_size} in data.epochs={cfg.data.epochs}, "
                            f"train.steps={cfg.train.steps} asks for more")
        if self.stream.train_size:
            log.info("data.train_size=%d: %d steps x %d examples make %.2f passes over the subset",
                     self.stream.train_size, cfg.train.steps, cfg.data.batch_size,
                     cfg.train.steps * cfg.data.batch_size / self.stream.train_size)
        if cfg.stats.reference_run:  # one line now, never at the evaluation that reads it
            check_reference_run(cfg, self.stream)
        self.resume_meta = check_run_dir(cfg)
        if self.resume_meta is not None and "data" in self.resume_meta:  # before any engine loads it
            self.stream.check_resume(self.resume_meta["data"])
        self.dist.barrier()  # every rank has read the run directory before rank 0 writes to it
        check_shared_dir(self.dist, cfg.train.out_dir)
        self.memory = MemoryRecorder(self.dist, self.device)  # baseline: before any model exists
        self.members = make_members(cfg, self.stream, self.device, self.placement, self.memory)
        refined = sweep.saved_refine_specs(self.resume_meta)  # resuming inside the refinement pass
        if refined:
            self.members += make_members(cfg, self.stream, self.device, self.placement, specs=refined,
                                         pass_name=sweep.REFINE)
        self._fixed = None
        self.stacker = None            # sweep.stack: planned when training starts (run)
        # at init, before any restore: optim.lr_unit = edge (η = lr × 2/λ0); stats.coord_every's W_0
        lambda0 = dynamics.apply_edge_lrs(self.members, self.batch(0), cfg)
        self.schedule = EvalSchedule.from_config(cfg)  # stats.schedule: which steps evaluate the probe
        self.coord_rows = CoordRows(cfg, self.members, self.stream.probe()["x"], self.device)
        self.checkpointer = Checkpointer(cfg, self.placement.main, self.members, RunDir(cfg.train.out_dir).checkpoints)
        if self.resume_meta is not None:  # each engine loads its members (their steps trim the rows below)
            self.checkpointer.load_members(self.resume_meta)
        if self.dist.is_main:
            self.run_dir = prepare_run_dir(cfg, self.resume_meta,
                                           {member_key(m): m.step for m in self.members},
                                           sweep.pass_floors(self.members, self.resume_meta))
        else:  # other ranks evaluate too (collective forwards) but write into a scratch copy
            self.run_dir = make_scratch_dir(cfg.train.out_dir, self.dist.rank)
        self.dist.barrier()
        # metrics.jsonl (+ TensorBoard, CSV, W&B from rank 0)
        self.writer = tracking.open_writer(self.run_dir, cfg.train, cfg=cfg, main=self.dist.is_main)
        self.memory.flush(self.writer)
        self.tokens_per_step = tokens_per_step(self.stream, cfg)
        self.evaluator = self._monitor(cfg)
        self.sharpness_rows = BatchSharpnessRows(cfg, self.dist.world_size, lambda0)  # batch_sharpness, λ0 rows
        self.guard = sweep.DivergenceGuard(cfg.train.diverge_factor)
        self._register_state()
        if self.resume_meta is not None:
            self.checkpointer.load_state(self.resume_meta)  # the stream, RNG, sweep and statistics
        self.evaluator.sync_ranges()  # one set of histogram bins on every rank

    def _register_state(self) -> None:
        """What a checkpoint holds besides the members, restored in this order: the data cursor,
        the RNGs, the sweep (first losses, stopped members, stacked widths, refined members), then
        the statistics (after the sweep: a stopped member is left out of them first)."""
        c = self.checkpointer
        c.register("data", self.stream)
        c.register("rng", RNG)
        c.register("sweep", State(lambda: sweep.state(self.guard, self.members, self.stacker),
                                  lambda saved: sweep.restore(saved, self.guard, self.members, self.evaluator)))
        c.register("stats", State(self._monitor_state, self.evaluator.load_state_dict))  # the summary stays on rank 0

    def _monitor_state(self) -> dict:
        self.evaluator.sync_preacts(self.members)  # every rank's preactivation rows merged on rank 0
        return self.evaluator.state_dict()

    def _monitor(self, cfg: Config):
        """Every statistic: the probe split over the ranks, histogram ranges from the run directory
        (other ranks' scratch run_dir is emptied at each start), sharpness on the training batch."""
        return monitor_for(cfg, self.run_dir, self.members, self.stream.probe(), self.writer, self.device,
                           ranges_dir=Path(cfg.train.out_dir), train_batch=self.batch, rank=self.dist.rank,
                           world=self.dist.world_size, train_subset=self._train_subset())

    def _train_subset(self) -> dict | None:
        """data.train_size: the subset's first min(K, data.probe_size) examples, evaluated beside the probe."""
        return self.stream.train_subset(self.cfg.data.probe_size) if self.stream.train_size else None

    # one optimizer step of one member on one batch; returns the loss (a tensor, no host sync)
    def train_step(self, m: Member, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step of one member on one batch (in data.micro_batch_size pieces); returns
        the loss, the global mean (a tensor, no host sync)."""
        set_lr(m.optimizer, m.cfg.optim, m.step, self.cfg.train.steps)
        m.model.train()
        stats = self.cfg.stats.enabled
        hooks = self.evaluator.training(m) if stats else contextlib.nullcontext()
        ctx = StepContext(lambda: autocast_for(self.cfg, self.device),
                          self.evaluator.paused if stats else contextlib.nullcontext)
        with hooks:  # forward/backward per micro-batch, clip, step, zero
            loss = self.dist.mean(m.handle.train_step(x, y, self.placement.k, ctx, m.loss_fn))
        m.grad_norm = m.handle.grad_norm
        m.step += 1
        return loss

    def batch(self, step: int):
        if self.cfg.train.full_batch:  # gradient descent: every step the stream's first batch
            if self._fixed is None:
                b = self.stream.batch(0)
                self._fixed = b["x"].to(self.device), b["y"].to(self.device)
            return self._fixed
        b = self.stream.batch(step)
        return b["x"].to(self.device, non_blocking=True), b["y"].to(self.device, non_blocking=True)

    def log_train(self, m: Member, loss: torch.Tensor, lr_factor_: float, extras: dict | None = None) -> None:
        row = {"kind": "train", "step": m.step, "tokens": m.step * self.tokens_per_step,
               "width": m.width, "seed": m.seed, "loss": float(loss), "lr": m.cfg.optim.lr * lr_factor_,
               **tracking.grad_fields(m.grad_norm, self.cfg.optim.grad_clip), **self.flops.fields(m),
               **(extras or {})}
        self.writer.write({**row, **member_tags(m), **sweep.pass_tag(m)})

    def _due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.cfg.train.steps

    def run(self) -> Path:
        cfg = self.cfg
        start = min((m.step for m in self.active(self.members)), default=cfg.train.steps)
        self.record_data(start)
        if start == 0:
            self.record_timescales(self.members)
        if start == 0:  # λ0 rows and the sharpness at initialization, on the first training batch
            x, y = self.batch(0)
            self.sharpness_rows.at_start(self.writer, self.members, self.active(self.members), x, y)
        if start == 0 and cfg.stats.enabled:
            self.evaluator.evaluate(0, 0, self.members)
        bar = tqdm(total=cfg.train.steps * len(self.members), initial=sum(m.step for m in self.members),
                   desc=f"{cfg.name} {len(self.members)} models", unit="step", disable=not cfg.train.progress,
                   file=sys.stderr, dynamic_ncols=True)
        t0 = time.time()
        self.stacker = self._plan_stacks()  # sweep.stack: one batched model per width
        self.stop.armed = True  # from here a first Ctrl-C finishes the step and checkpoints
        clock = preempt.CheckpointClock(cfg.train.ckpt_minutes)
        self.throughput = tracking.Throughput(self.tokens_per_step, self.device, start)
        self.flops = flops.MFU(self.members, data_io(self.stream, cfg), self.device, self.dist.world_size)
        refined = [m for m in self.members if sweep.pass_tag(m)]  # a resume inside the refinement pass has them
        self._train_groups([m for m in self.members if m not in refined], bar, clock)
        if cfg.sweep.lr_refine and not self.stop.raised:  # the second pass: trainer/sweep.py
            self._train_groups(refined or self._start_refinement(bar), bar, clock)
        bar.close()
        if self.stacker:
            self.stacker.close()  # members own their parameters' storage again
        final = self.checkpointer.save(final=True)
        if self.stop.raised:  # the signal came during the last step or the final checkpoint
            self._preempted(final)
        self.writer.write({"kind": "run", "step": cfg.train.steps, "tokens": cfg.train.steps * self.tokens_per_step,
                           "width": 0, "seed": 0, "wall_s": time.time() - t0, "models": len(self.members),
                           "diverged": sum(m.diverged is not None for m in self.members),
                           "commit": source_commit()})
        self.writer.close()
        if not self.dist.is_main:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return Path(cfg.train.out_dir) if self.dist.active else self.run_dir

    def _train_groups(self, members: list[Member], bar, clock) -> None:
        """Train `members` to train.steps: all together per batch (lockstep) or one after another."""
        cfg = self.cfg
        for group in [members] if cfg.sweep.mode == "lockstep" else [[m] for m in members]:
            while self.active(group) and min(m.step for m in self.active(group)) < cfg.train.steps:
                step = min(m.step for m in self.active(group))
                x, y = self.batch(step)
                losses = self._step_members(group, step, x, y, bar)  # the diverged ones stop
                self._monitor_after_step(step + 1, group, x, y)
                self._log_after_step(step + 1, group, losses, bar)
                self._checkpoint_after_step(step + 1, clock)
            if cfg.sweep.mode == "sequential" and cfg.stats.enabled:
                self.evaluator.flush_pending()

    def _start_refinement(self, bar) -> list[Member]:
        """sweep.lr_refine: checkpoint the finished first pass, then build the refined members from
        its final losses (trainer/sweep.py) and give them monitors; returns them, at step 0."""
        cfg = self.cfg
        if self.stacker:
            self.stacker.close()
        self.checkpointer.save(final=False)  # a resume from here recomputes the same refined specs from the same rows
        self.dist.barrier()     # rank 0 has written every row of the first pass
        specs = sweep.refine_specs(cfg, read_metrics(RunDir(cfg.train.out_dir).metrics))
        new = make_members(cfg, self.stream, self.device, self.placement, specs=specs, pass_name=sweep.REFINE)
        log.info("sweep.lr_refine=%d: %d more members, learning rates %s", cfg.sweep.lr_refine, len(new),
                 {w: sorted({lr for w2, lr, _ in specs if w2 == w}) for w in dict.fromkeys(w for w, _, _ in specs)})
        self.members += new
        self.record_timescales(new)
        self.coord_rows.add(new)  # stats.coord_every: W_0 of the new members
        self.evaluator.add(new)
        self.stacker = self._plan_stacks()
        self.flops = flops.MFU(self.members, data_io(self.stream, cfg), self.device, self.dist.world_size)
        bar.total += cfg.train.steps * len(new)
        if cfg.stats.enabled:
            self.evaluator.evaluate(0, 0, new)
        return new

    @staticmethod
    def active(group: list[Member]) -> list[Member]:
        """The members still training (not stopped for divergence)."""
        return [m for m in group if m.diverged is None]

    def stop_diverged(self, group: list[Member], losses: dict, bar) -> None:
        """Stop every member of `group` whose loss of this step diverged; the others go on."""
        for m, reason, value in self.guard.check(group, losses):
            m.diverged = sweep.diverged_row(m, reason, value, self.tokens_per_step)
            self.log_train(m, losses[m.name], lr_factor(m.step - 1, m.cfg.optim, self.cfg.train.steps))
            self.writer.write(m.diverged)
            sweep.drop_member(self.evaluator, m)
            bar.update(self.cfg.train.steps - m.step)
            log.warning("%s diverged at step %d (%s): stopped, the others go on", m.name, m.step, reason)

    def record_timescales(self, members: list[Member]) -> None:
        """One "optim" row a member: each optimizer group's lr, weight decay, ε and AdamW timescale τ
        (a refined member's carries pass: refine, so a resume inside that pass drops it with the rest)."""
        for m in members:
            row = {"kind": "optim", "step": 0, "tokens": 0, "width": m.width, "seed": m.seed, "member": m.name,
                   "weight_decay_mode": m.cfg.optim.weight_decay_mode, "groups": timescales(m.table, m.cfg.optim)}
            self.writer.write({**row, **member_tags(m), **sweep.pass_tag(m)})

    def record_data(self, step: int) -> None:
        """The stream's fingerprint in metrics.jsonl and the probe split beside the run, so a
        reference run and this one can be checked to share source, split and probe."""
        if not self.dist.is_main:
            return
        info = json.loads(json.dumps(self.stream.describe(), default=str))
        self.writer.write({"kind": "data", "step": step, "tokens": step * self.tokens_per_step, "width": 0,
                           "seed": 0, **info})
        probe_file = RunDir(self.run_dir).probe
        if not probe_file.exists():
            with writing(probe_file, tmp=probe_file):  # a full disk leaves no half a probe file
                self.stream.save_probe(probe_file)

    def _step_members(self, group: list[Member], step: int, x, y, bar) -> dict:
        """One optimizer step of every member of `group` due at `step` ({name: loss}); the
        "step" memory row after the first; members whose loss diverged stop."""
        due = [m for m in self.active(group) if m.step == step]
        losses = self.stacker.train(due, x, y) if self.stacker else {m.name: self.train_step(m, x, y) for m in due}
        bar.update(len(losses))
        if "step" not in self.memory.done:
            self.memory.mark("step", [m.table for m in self.members], step + 1, (step + 1) * self.tokens_per_step)
            self.memory.flush(self.writer)
        self.dist.maybe_die(step + 1)
        self.stop_diverged(group, losses, bar)
        return losses

    def _monitor_after_step(self, step: int, group: list[Member], x, y) -> None:
        """The statistics due after `step`: batch sharpness and coord rows on this step's batch,
        the evaluation the schedule has at this step (stats.schedule)."""
        tokens = step * self.tokens_per_step
        self.sharpness_rows.after_step(self.writer, step, tokens, self.active(group), x, y)
        self.coord_rows.after_step(self.writer, step, tokens, self.active(group))
        if self.cfg.stats.enabled and self.schedule.due(step):
            self.evaluator.sync_preacts(group)  # whole-batch preact stats
            self.evaluator.evaluate(step, step * self.tokens_per_step, self.active(group))

    def _log_after_step(self, step: int, group: list[Member], losses: dict, bar) -> None:
        """The train rows at train.log_every (a stopped member's last row was written as it stopped)."""
        if not self._due(step, self.cfg.train.log_every):
            return
        f = lr_factor(step - 1, self.cfg.optim, self.cfg.train.steps)
        extras = self.throughput.extras(step)  # tokens/s since the last log, peak memory
        extras.update(self.flops.step_fields(self.active(group), extras))  # mfu of the step
        for m in self.active(group):
            if m.name in losses:
                self.log_train(m, losses[m.name], f, extras)
        ref = losses.get(group[0].name)
        if ref is not None:
            mfu = {"mfu": f"{extras['mfu']:.1%}"} if "mfu" in extras else {}
            bar.set_postfix({group[0].name: f"{float(ref):.3f}", **mfu}, refresh=False)

    def _checkpoint_after_step(self, step: int, clock: preempt.CheckpointClock) -> None:
        """train.ckpt_every's checkpoint, then the clock's or a stop signal's (which ends the run)."""
        every = self.cfg.train.ckpt_every
        if every and step % every == 0 and step < self.cfg.train.steps:
            self.checkpointer.save(final=False)
        stopped = preempt.between_steps(self.stop, clock, self.checkpointer, self.dist)
        if stopped is not None:
            self._preempted(stopped)

    def _preempted(self, path: Path) -> None:
        step = self.checkpointer.slowest_step()
        preempt.raise_preempted(self.stop, path, step, self.writer, step * self.tokens_per_step, self.cfg.train.out_dir)

    def _plan_stacks(self) -> stacked.Stacker | None:
        stacker = stacked.Stacker(self.cfg, self.placement.k, lambda: autocast_for(self.cfg, self.device),
                                  self.train_step, self.evaluator)
        return stacked.plan(stacker, self.active(self.members), sweep.saved_stacked(self.resume_meta))


def member_key(m: Member) -> tuple:
    """The key run/metrics.truncate_after finds a member's rows by: (width, seed, base_lr), and
    its depth last in a depth sweep."""
    key = (m.width, m.seed, m.base_lr)
    return key if m.depth is None else (*key, m.depth)


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


def run(cfg: Config, report=None) -> Path:
    """Train the sweep `cfg` describes; returns the run directory. report: called with the run
    directory on the main rank unless train.report=false (fastwidth.api.train passes the report
    room's report_at_end, which writes the report and prints the headline numbers: the report
    sits above train/). Raises preempt.Preempted after a SIGTERM or SIGUSR1 has stopped it at a
    checkpoint."""
    with contextlib.ExitStack() as held:  # the run directory's lock, until the report is written
        with preempt.StopFlag() as stop:
            run_dir, trainer = _train(cfg, stop, held)
        if report is not None and trainer.dist.is_main and trainer.cfg.train.report:
            report(run_dir)
            tracking.log_report(trainer.writer, run_dir)  # train.wandb: the figures
    return run_dir


def _train(cfg: Config, stop: preempt.StopFlag, held: contextlib.ExitStack) -> tuple[Path, Trainer]:
    defaulted = not cfg.train.out_dir
    cfg = resolve(cfg)  # fixes out_dir (its default carries the time) before anything checks it
    if defaulted and cfg.dist.backend != "none" and launched_world() > 1:
        cfg = agree_on_out_dir(cfg)  # every rank takes rank 0's time-stamped name
    check_outside_data(cfg)  # before the lock makes the directory inside the corpus
    check_creatable(cfg.train.out_dir)
    # rank 0 locks the directory for every rank of its run (the launcher numbers them before any
    # process group exists); the others clean up only their scratch directory after a failed start
    rank = int(os.environ.get("RANK", "0") or 0) if cfg.dist.backend != "none" else 0
    lock = held.enter_context(RunLock(cfg.train.out_dir)) if rank == 0 else None
    undo = undo_on_error(cfg.train.out_dir, made=lock.made) if lock is not None else \
        undo_on_error(cfg.train.out_dir, only=[RunDir(cfg.train.out_dir).scratch(rank).root])
    trainer = None
    try:
        with machine_faults(cfg):  # a full disk, a failed allocation: one line saying what is kept
            with undo:  # a mistake found while setting up leaves nothing
                trainer = Trainer(cfg, stop)
            held.callback(tracking.finish, trainer.writer)  # W&B's runs end after the report, or on a failure
            with trainer.dist.guard("training"):  # one process: no process group to guard or close
                return trainer.run(), trainer
    finally:
        if trainer is not None:
            trainer.dist.close()
