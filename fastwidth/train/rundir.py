"""The run directory before training starts: can it be made, and nothing half-made left behind.

A mistake found while a run is being set up (a reference run that is not there, a checkpoint
that does not match) must not leave a directory that makes the corrected command fail with
"already holds a run": `undo_on_error` removes whatever setting up created.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from fastwidth.errors import UserError


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_creatable(out_dir: str | Path) -> None:
    """One line (UserError) when train.out_dir cannot be a directory this process writes into."""
    path = Path(out_dir)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"train.out_dir {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"train.out_dir {path} is not writable")
        return
    base = _nearest_existing(path.absolute())
    if not base.is_dir():
        raise UserError(f"train.out_dir {path} cannot be made: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"train.out_dir {path} cannot be made: {base} is not writable")


def make_dir(path: Path, what: str = "train.out_dir") -> None:
    """mkdir -p with the OS's refusal as one line (read-only file systems, /proc, quotas)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        if e.errno == errno.ENOENT:
            reason = f"the file system refuses a directory at {e.filename}"
        raise UserError(f"{what} {path} cannot be made: {reason}") from None


@contextlib.contextmanager
def undo_on_error(out_dir: str | Path):
    """Inside: setting up a run. On any exception, remove the entries of `out_dir` (and the
    directories above it) that did not exist on entry, then re-raise."""
    path = Path(out_dir).absolute()
    top = _nearest_existing(path)  # everything below it that exists afterwards was made inside
    before = set(path.iterdir()) if path.is_dir() else None
    try:
        yield
    except BaseException:
        if before is None:
            if top != path and top.is_dir():
                created = path
                while created.parent != top:
                    created = created.parent
                shutil.rmtree(created, ignore_errors=True)
        else:
            for entry in set(path.iterdir()) - before if path.is_dir() else ():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        raise
