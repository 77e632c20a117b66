"""A user's output target (export -o, export --format hf -o, data prepare --out, report -o): never
overwritten without asking, never a run directory's own files, never left half-written.

    check_target(out, flag="export -o", force=args.force, kind="file")   # one line (UserError) or nothing
    with replacing(out, kind="file") as tmp:                              # write tmp; it becomes out at the end
        save_file(tensors, str(tmp))

An existing target is refused unless `force`; an empty directory holds nothing to lose and is
taken as it is. With `force` a file is replaced by rename (atomic), a directory wholly: the new
one is written beside it, the old one set aside, the new one renamed into place and only then
the old one removed (a failure puts the old one back). Whatever the flag, a target that is, or is
inside, a run directory's own files (run/paths.py RunDir.owns; its report/ is not one of them) is
refused, and so is a directory to replace that holds a run directory.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from fastwidth.errors import UserError
from fastwidth.run.lock import remove_entry
from fastwidth.run.paths import RunDir


def _is_run(path: Path) -> bool:
    run = RunDir(path)
    return run.config.is_file() and (run.metrics.is_file() or run.checkpoints.is_dir())


def owning_run(path: Path) -> RunDir | None:
    """The run directory whose own files `path` is (or is inside), if any."""
    path = Path(path).resolve()  # a link to a run's file is that file
    for cand in (path, *path.parents):
        if _is_run(cand) and RunDir(cand).owns(path):
            return RunDir(cand)
    return None


def _run_inside(path: Path) -> Path | None:
    """A run directory at or below directory `path`, if any (what replacing it would delete)."""
    for top, dirs, _ in os.walk(path):
        if _is_run(Path(top)):
            return Path(top)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return None


def check_target(out: str | Path, *, flag: str, force: bool, kind: str) -> None:
    """One line (UserError) when `out` may not be written by `flag`; `kind` is "file" or "dir"."""
    out = Path(out)
    run = owning_run(out)
    if run is not None and run.root.resolve() == out.resolve():
        raise UserError(f"{flag} {out} is run directory {run.root}, which no command overwrites (not even with "
                        f"--force); write somewhere else")
    if run is not None:
        raise UserError(f"{flag} {out} would write into run directory {run.root}'s own files, which no "
                        f"command overwrites (not even with --force); write somewhere else")
    if not (out.exists() or out.is_symlink()):
        return
    if kind == "dir" and out.is_dir() and not out.is_symlink():
        if not any(out.iterdir()):
            return
        if force and (inner := _run_inside(out)) is not None:
            raise UserError(f"{flag} {out} --force would delete run directory {inner} inside it; write somewhere else")
    if not force:
        what = "directory" if out.is_dir() else "file"
        raise UserError(f"{flag} {out}: the {what} exists; --force replaces it, or write somewhere else")


@contextlib.contextmanager
def replacing(out: str | Path, *, kind: str):
    """Yields a temporary path beside `out` to write the new file or directory to; when the block
    ends without an exception it takes `out`'s place, and on any exception it is removed."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    remove_entry(tmp)
    try:
        yield tmp
        if kind == "file" or not out.exists():
            os.replace(tmp, out)
        else:
            _swap_dir(tmp, out)
    finally:
        remove_entry(tmp)


def _swap_dir(new: Path, out: Path) -> None:
    """Put directory `new` where directory (or file) `out` is; remove the old one once the new is in place."""
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    remove_entry(old)

