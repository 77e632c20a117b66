"""The trainer's top-level error boundary: what the machine runs out of, as one line.

    with machine_faults(cfg):
        trainer = Trainer(cfg, stop)
        trainer.run()

A full disk, a read-only file system or a lost permission while the run writes its own files
(rows, signatures, the probe and ranges files, checkpoints) ends with one line naming the file,
the last whole checkpoint and the rows kept; a failed allocation while building the members and
engines or stepping ends with one line giving the planner's estimate for this config and the
knobs that lower it. Both are ResourceError (exit 2). The components below raise plain OSErrors
that name their file (run/writes.py) and remove their own partial files; this module only words
what is left. Any other error keeps its traceback: it is a bug.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from fastwidth.errors import ResourceError, UserError
from fastwidth.run import checkpoint as ckpt
from fastwidth.run.metrics import read_metrics
from fastwidth.run.paths import RunDir

# errors a user fixes on the machine (space, quota, a read-only mount, permissions), not bugs
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
# torch's CPU allocator and CUDA say so in the first line of a RuntimeError
ALLOCATION_FAILURES = ("can't allocate memory", "out of memory")


@contextlib.contextmanager
def machine_faults(cfg):
    """Turn a failed write inside the run directory and a failed allocation into ResourceError."""
    try:
        yield
    except OSError as err:
        if not _is_run_write(err, Path(cfg.train.out_dir)):
            raise
        raise ResourceError(write_fault_line(err, Path(cfg.train.out_dir))) from None
    except (MemoryError, RuntimeError) as err:
        if not is_allocation_failure(err):
            raise
        raise ResourceError(memory_fault_line(err, cfg)) from None


def _is_run_write(err: OSError, out_dir: Path) -> bool:
    if err.errno not in WRITE_ERRNOS:
        return False
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True  # a full disk is the machine's wherever the write was
    if not err.filename:
        return False
    name, out = Path(os.path.abspath(err.filename)), Path(os.path.abspath(out_dir))
    return name == out or out in name.parents


def write_fault_line(err: OSError, out_dir: Path) -> str:
    """One line: the file, why, the latest whole checkpoint and the last step with rows."""
    where = err.filename or f"into {out_dir}"  # a sink's write() names no file
    return f"cannot write {where}: {err.strerror}; {kept(out_dir)}"


def kept(out_dir: Path) -> str:
    """What a run stopped by a failed write still holds, and how to go on from it."""
    run = RunDir(out_dir)
    if not run.root.is_dir():
        return "nothing was kept (the run had not started); free space or choose another train.out_dir"
    latest = None
    with contextlib.suppress(OSError, UserError):
        latest = ckpt.latest_checkpoint(run.checkpoints)
    steps = []
    with contextlib.suppress(OSError, UserError):
        steps = [r.get("step", 0) for r in read_metrics(run.metrics) if isinstance(r.get("step"), int)]
    rows = f"rows of {run.metrics} up to step {max(steps)}" if steps else "no rows"
    if latest is None:
        return f"kept {rows} and no checkpoint; free space and start the run again"
    return (f"kept checkpoint {latest} and {rows}; free space and rerun the same command with "
            f"--set train.resume=auto to continue")


def is_allocation_failure(err: BaseException) -> bool:
    """MemoryError, torch.OutOfMemoryError, or torch's allocators' RuntimeError."""
    if isinstance(err, MemoryError):
        return True
    first = (str(err).strip().splitlines() or [""])[0]
    return type(err).__name__ == "OutOfMemoryError" or any(s in first for s in ALLOCATION_FAILURES)


def memory_fault_line(err: BaseException, cfg) -> str:
    """One line: what failed, the planner's estimate per rank for this config, the knobs."""
    from fastwidth.parallel.env import launched_world
    from fastwidth.parallel.plan import choice_of, plan_sweep
    world = launched_world() if cfg.dist.backend != "none" else 1
    what = (str(err).strip().splitlines() or [type(err).__name__])[0][:200] or type(err).__name__
    try:
        plan = plan_sweep(cfg, world)
        n = plan["members"]
        estimate = (f"the planner estimates {_bytes(plan['peak'])} per rank for this sweep ({n} member"
                    f"{'s' if n != 1 else ''}, engine {choice_of(cfg).label}, {world} rank{'s' if world != 1 else ''})")
    except (MemoryError, UserError):
        estimate = "the planner could not be asked either (see `fastwidth plan --config ...`)"
    return (f"out of memory ({what}); {estimate}; lower it with dist.backend=fsdp2 or deepspeed with "
            f"dist.zero_stage=3 (shard each member), fewer sweep.widths or sweep.seeds per process, a smaller "
            f"data.batch_size or data.micro_batch_size, or train.activation_checkpointing=block")


def _bytes(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"
