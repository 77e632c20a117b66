"""A failed write (disk full, read-only file system, no permission) as an OSError naming its file.

    with writing(path, tmp=path.with_suffix(".tmp")):
        save_file(tensors, str(tmp))
        tmp.replace(path)

Python's own errors from write() and flush() carry no file name, and safetensors' Rust writer
raises SafetensorError for an I/O error; the trainer's top level (trainer/faults.py) turns the
OSError this raises into one line naming the file and what the run kept. The partial temporary
file goes first, so a full disk leaves nothing half-written behind.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path


def os_error(err: Exception, path: Path) -> OSError:
    """`err` (an OSError, or safetensors' error whose text holds `Os { code: N, ...}`) as an
    OSError with its errno and `path` as the file name."""
    code = getattr(err, "errno", None)
    if code is None:
        found = re.search(r"code: (\d+)", str(err))
        code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code), str(path))


@contextlib.contextmanager
def writing(path: Path, tmp: Path | None = None):
    """Re-raise an I/O failure inside the block as os_error(err, path), `tmp` removed first."""
    from safetensors import SafetensorError
    try:
        yield
    except (OSError, SafetensorError) as err:
        if not isinstance(err, OSError) and "IoError" not in str(err):
            raise  # safetensors refused the tensors themselves: a bug, not the disk
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink()
        raise os_error(err, path) from None
