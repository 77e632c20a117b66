"""The run directory before training starts: can it be made, and nothing half-made left behind.
(Whether it holds a run to resume, and making it: run/prepare.py.)

A mistake found while a run is being set up (a reference run that is not there, a checkpoint
that does not match) must not leave a directory that makes the corrected command fail with
"already holds a run": `undo_on_error` removes whatever setting up created.

One run per directory: `RunLock` holds an flock on out_dir/.lock (which names the owner's pid
and host) from before set-up until the run ends, so a second run into the same directory is
refused with one line before it reads or removes anything. Under torchrun all ranks share the
directory: rank 0 holds the lock for them.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from fastwidth.errors import UserError
from fastwidth.run.paths import RunDir

log = logging.getLogger("fastwidth.run")


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
def undo_on_error(out_dir: str | Path, made: Path | None = None, only: list[Path] | None = None):
    """Inside: setting up a run. On any exception, remove what this process created, then re-raise:
    `made` (the directory RunLock made for this run) whole; else the entries of `out_dir` (and the
    directories above it) that did not exist on entry, or of those, only the paths in `only` (a
    rank other than 0 owns just its scratch directory; rank 0 cleans up the rest)."""
    path = Path(out_dir).absolute()
    top = _nearest_existing(path)  # everything below it that exists afterwards was made inside
    before = set(path.iterdir()) if path.is_dir() else None
    try:
        yield
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        elif only is not None:
            for entry in only:
                if before is None or Path(entry).absolute() not in before:
                    remove_entry(Path(entry))
        elif before is None:
            if top != path and top.is_dir():
                created = path
                while created.parent != top:
                    created = created.parent
                shutil.rmtree(created, ignore_errors=True)
        else:
            for entry in set(path.iterdir()) - before if path.is_dir() else ():
                remove_entry(entry)
        raise


def remove_entry(entry: Path) -> None:
    """Remove file, link or directory `entry` (a directory with everything in it); gone already is fine."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _made_dirs(path: Path) -> Path | None:
    """mkdir -p `path`; the topmost directory this call made, when it made every one below it
    too (None when `path` existed, or when another process made part of the chain meanwhile)."""
    chain = []
    p = path
    while not p.exists() and p != p.parent:
        chain.append(p)
        p = p.parent
    made = None
    for d in reversed(chain):
        try:
            os.mkdir(d)
            made = made or d
        except FileExistsError:
            made = None
        except OSError:
            make_dir(path)  # the OS's refusal as one line
    return made


class RunLock:
    """An exclusive flock on out_dir/.lock for the life of a run; a context manager.

    Entering makes out_dir when missing (remembered, so a failed start removes it again), takes
    the lock without waiting and writes {"pid", "host", "since"} into the file. A held lock is a
    UserError naming its owner. A lock file left by a process that died (kill -9: the kernel
    drops the flock, the file stays) is taken over, with a warning naming the dead owner.
    Leaving removes the file while still holding the lock, then releases it; a process that
    opened the old file meanwhile sees the file it locked is no longer out_dir/.lock and retries.
    """

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir).absolute()
        self.path = RunDir(self.dir).lock
        self.made: Path | None = None  # what entering made: a failed start removes it (undo_on_error)
        self._fd: int | None = None
        self._taken_by_other = False  # the directory we made is another run's now: leave it

    def __enter__(self) -> "RunLock":
        self.made = _made_dirs(self.dir)
        try:
            self._take()
        except BaseException:
            # two runs started together: the one that made out_dir may lose the lock to the
            # other, whose lock file then lives in it (removing it would delete the winner's run)
            if self.made is not None and not self._taken_by_other:
                shutil.rmtree(self.made, ignore_errors=True)
            raise
        return self

    def _take(self) -> None:
        for _ in range(100):  # a retry only when the owner removed the file between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                for _ in range(200):  # the winner writes its pid just after its flock: 2 s at most
                    if owner:
                        break
                    time.sleep(0.01)
                    owner = _read_owner(fd)
                os.close(fd)
                self._taken_by_other = True
                raise UserError(f"train.out_dir {self.dir} is in use by another run ({_describe(owner)}); "
                                f"wait for it to end or choose another train.out_dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            break
        else:
            raise UserError(f"train.out_dir {self.dir}: its lock file keeps changing; is another run starting?")
        stale = _read_owner(self._fd)
        if stale:  # the flock was free, so its owner is gone; the pid says how sure that is
            here = stale.get("host") == socket.gethostname()
            gone = "no longer running" if here and not _alive(int(stale.get("pid") or 0)) else "its flock was free"
            log.warning("train.out_dir %s: taking over the lock left by %s (%s)", self.dir, _describe(stale), gone)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(self._fd)

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _read_owner(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        owner = json.loads(raw.decode() or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict) -> str:
    if not owner:
        return "owner not recorded yet"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {owner.get('since', '?')}"

