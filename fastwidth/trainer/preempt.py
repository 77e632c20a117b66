"""Preemption and periodic checkpoints: what a cluster job needs to survive being stopped.

A scheduler that preempts a job (SLURM, Kubernetes, most clouds) sends SIGTERM, or SIGUSR1 ahead
of a time limit (`sbatch --signal=USR1@120`), and SIGKILL after a grace period. `StopFlag` turns
either signal into a flag the loop reads between steps: the step in flight finishes, a checkpoint
is written, and the process exits with 143 (128 + SIGTERM), which schedulers read as "stopped by
a signal" and requeue. Resuming from that checkpoint is bit-equal to a run never stopped.

Ctrl-C (SIGINT) is a preemption too, from the keyboard: the first one stops the run the same way
and exits 130 (128 + SIGINT, what a shell reports for Ctrl-C); a second one aborts at once
(KeyboardInterrupt), for a step that takes too long to wait for.

`CheckpointClock` asks for a checkpoint every `train.ckpt_minutes` of wall time, so a SIGKILL
without warning (node failure, OOM killer) loses at most that much work.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger("fastwidth.trainer")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143 for the scheduler's signals (SIGTERM, SIGUSR1)
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # 130 for Ctrl-C


class Preempted(Exception):
    """The run was stopped by a signal after writing a checkpoint; rerun it with train.resume=auto."""

    def __init__(self, run_dir, step: int, signal_name: str, checkpoint):
        self.run_dir, self.step, self.signal_name, self.checkpoint = run_dir, step, signal_name, checkpoint
        self.exit_code = INTERRUPTED_EXIT_CODE if signal_name == "SIGINT" else PREEMPTED_EXIT_CODE
        super().__init__(f"{signal_name} received: stopped after step {step}, checkpoint {checkpoint}; "
                         f"rerun the same command with --set train.resume=auto to continue")


class StopFlag:
    """Context manager: while inside, SIGTERM, SIGUSR1 and a first SIGINT set `self.signal_name`
    instead of killing; a second SIGINT raises KeyboardInterrupt where the process is.

    Handlers can be installed only from the main thread; elsewhere (a notebook worker thread) the
    flag stays unset and the signals keep their previous behaviour.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self.armed = False  # set when training starts: a Ctrl-C before that has nothing to save
        self._previous: dict = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and (self.signal_name == "SIGINT" or not self.armed):
            raise KeyboardInterrupt  # a second Ctrl-C, or one while setting up: no waiting
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            more = "; Ctrl-C again aborts without one" if signum == signal.SIGINT else ""
            log.warning("%s received: finishing this step, then writing a checkpoint%s", self.signal_name, more)

    @property
    def raised(self) -> bool:
        return self.signal_name is not None


class CheckpointClock:
    """Due every `minutes` of wall time since the last checkpoint; 0 = never."""

    def __init__(self, minutes: float, clock=time.monotonic):
        self.period_s = minutes * 60.0
        self._clock = clock
        self._last = clock()

    def due(self) -> bool:
        return self.period_s > 0 and self._clock() - self._last >= self.period_s

    def reset(self) -> None:
        self._last = self._clock()


def agree(flags: list[bool], dist) -> list[bool]:
    """Each flag true on every rank when it is true on any rank: ranks must stop, and checkpoint,
    at the same step (their signals and wall clocks differ). One small all-reduce a step."""
    if not dist.active or dist.world_size == 1:
        return list(flags)
    import torch
    t = dist.mean(torch.tensor([float(f) for f in flags], device=dist.device))
    return [bool(v > 0) for v in t.tolist()]


def between_steps(stop: StopFlag, clock: CheckpointClock, checkpointer, dist) -> Path | None:
    """After every step: checkpoint when the clock says so or a stop signal came (on any rank:
    `agree`). Returns the checkpoint when stopping (the caller then calls raise_preempted), else None."""
    stopping, due = agree([stop.raised, clock.due()], dist)
    if not (stopping or due):
        return None
    path = checkpointer.save(final=checkpointer.slowest_step() >= checkpointer.cfg.train.steps)
    clock.reset()
    return path if stopping else None


def raise_preempted(stop: StopFlag, path: Path, step: int, writer, tokens: int, run_dir) -> None:
    """Write the "preempted" row (step, tokens: where the slowest member stands), close the
    writer and raise Preempted (the caller exits 143, or 130 for Ctrl-C)."""
    name = stop.signal_name or "stop signal"
    writer.write({"kind": "preempted", "step": step, "tokens": tokens, "width": 0, "seed": 0, "signal": name})
    writer.close()
    log.warning("%s: checkpoint %s written at step %d; resume with train.resume=auto", name, path, step)
    raise Preempted(run_dir, step, name, path)
