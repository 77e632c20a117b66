"""A full disk or a read-only directory for one subprocess of tests/fault_matrix.py, no root needed.

With this directory on PYTHONPATH, Python imports this module at start-up; it does nothing unless
FASTWIDTH_FAULT_PATH names a directory:
    FASTWIDTH_FAULT_ERRNO  ENOSPC (default): writes of files under the directory fail once
                           FASTWIDTH_FAULT_AFTER bytes (default 0) went there, the write that
                           crosses the line cut short, as on a full disk;
                           EROFS or EACCES: making, writing, renaming or removing anything there
                           fails at once, as on a read-only mount (root ignores permission bits,
                           so chmod cannot show this to a test running as root)
    FASTWIDTH_FAULT_MATCH  only paths containing this text (e.g. "step_000003": one checkpoint)
Python's file objects fail as the kernel makes them fail (OSError from write or open);
safetensors' Rust writer fails as it does on a real full disk: SafetensorError("... IoError(Os
{ code: 28, ...})"). torch.save's own C++ writer is not reached.
"""
import builtins
import errno
import io
import os

PREFIX = os.path.abspath(os.environ["FASTWIDTH_FAULT_PATH"]) if os.environ.get("FASTWIDTH_FAULT_PATH") else None
CODE = getattr(errno, os.environ.get("FASTWIDTH_FAULT_ERRNO", "ENOSPC"))
MATCH = os.environ.get("FASTWIDTH_FAULT_MATCH", "")
READ_ONLY = CODE != errno.ENOSPC
room = [int(os.environ.get("FASTWIDTH_FAULT_AFTER", "0"))]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def hit(path) -> bool:
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False
    p = os.path.abspath(os.fsdecode(path))
    return (p == PREFIX or p.startswith(PREFIX + os.sep)) and MATCH in p


def fault(path=None) -> OSError:
    return OSError(CODE, os.strerror(CODE), *([os.fsdecode(path)] if path is not None else []))


class Filling:
    """A file object on the full disk: writes past the room left fail (write() names no file)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        if len(data) > room[0]:
            self._f.write(data[:room[0]])
            room[0] = 0
            raise fault()
        room[0] -= len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def install() -> None:
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def open_(file, mode="r", *a, **kw):
        writes = any(c in mode for c in "wax+")
        if writes and hit(file):
            if READ_ONLY:
                raise fault(file)
            return Filling(real_open(file, mode, *a, **kw))
        return real_open(file, mode, *a, **kw)

    def os_open(path, flags, *a, **kw):
        if READ_ONLY and flags & WRITE_FLAGS and hit(path):
            raise fault(path)
        return real_os_open(path, flags, *a, **kw)

    def mkdir(path, *a, **kw):
        if READ_ONLY and hit(path) and not os.path.exists(path):
            raise fault(path)
        return real_mkdir(path, *a, **kw)

    def refuse(real):
        def changed(*paths, **kw):
            if READ_ONLY and any(hit(p) for p in paths[:2]):
                raise fault(paths[0])
            return real(*paths, **kw)
        return changed

    builtins.open = io.open = open_
    os.open, os.mkdir = os_open, mkdir
    for name in ("replace", "rename", "unlink", "remove", "rmdir"):
        setattr(os, name, refuse(getattr(os, name)))
    _safetensors_writer()


def _safetensors_writer() -> None:
    """safetensors.torch binds serialize_file when it is first imported: replace it before."""
    import safetensors
    real = safetensors.serialize_file

    def serialize_file(tensors, filename, *a, **kw):
        if not hit(filename):
            return real(tensors, filename, *a, **kw)
        if READ_ONLY:
            raise safetensors.SafetensorError(f"Error while serializing: IoError(Os {{ code: {CODE}, "
                                              f"message: \"{os.strerror(CODE)}\" }})")
        real(tensors, filename, *a, **kw)
        size = os.path.getsize(filename)
        if size > room[0]:
            os.truncate(filename, room[0])
            room[0] = 0
            raise safetensors.SafetensorError(f"Error while serializing: IoError(Os {{ code: {CODE}, kind: "
                                              f"StorageFull, message: \"{os.strerror(CODE)}\" }})")
        room[0] -= size
    safetensors.serialize_file = serialize_file


if PREFIX is not None:
    install()
