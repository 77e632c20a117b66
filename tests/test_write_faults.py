"""What the machine runs out of, in-process: a full disk while writing rows, signatures and
checkpoints, a metrics row that is not an object, a failed allocation, the native build's cache
directory, and the SIGINT handler a run finds. Each ends in one line with nothing half-written
left; the same faults from outside, through the CLI, are cases of tests/fault_matrix.py."""
import errno
import io
import json
import os
import signal

import pytest

from fastwidth.errors import DataError, ResourceError
from fastwidth.kernels import native
from fastwidth.run import checkpoint as ckpt
from fastwidth.run import metrics as metrics_mod
from fastwidth.run.metrics import read_metrics
from fastwidth.stats import signature
from fastwidth.trainer import loop, preempt
from fastwidth.trainer.loop import run

from test_train import TINY_MLP, cfg_of

TINY = [*TINY_MLP, "stats.every=2", "train.threads=1"]


def enospc(path=None):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([str(path)] if path else []))


def assert_nothing_half_written(out):
    """No temporary checkpoint, signature or row file, and the lock released."""
    left = [p.relative_to(out) for p in out.rglob("*") if p.name.startswith(".tmp-") or p.suffix == ".tmp"]
    assert left == [] and not (out / ".lock").exists()
    read_metrics(out / "metrics.jsonl")  # every row whole


def safetensors_enospc():
    """What safetensors' Rust writer raises on a full disk: no OSError, the errno in its text."""
    from safetensors import SafetensorError
    return SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                           'message: "No space left on device" })')


@pytest.mark.parametrize("fault", [enospc, safetensors_enospc], ids=["oserror", "safetensors"])
def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_says_so(tmp_path, monkeypatch, fault):
    saves, save_file = [], ckpt.save_file

    def save_then_fill(tensors, path, *a, **kw):  # the second checkpoint's first file fills the disk
        saves.append(path)
        if len(saves) > 2 * 2:  # 2 members × (model, optim) per checkpoint
            open(path, "wb").write(b"\0" * 10)
            raise fault()
        return save_file(tensors, path, *a, **kw)
    monkeypatch.setattr(ckpt, "save_file", save_then_fill)
    with pytest.raises(ResourceError) as info:
        run(cfg_of(tmp_path, TINY, "train.steps=4", "train.ckpt_every=2"))
    line, out = str(info.value), tmp_path / "run"
    assert "\n" not in line and line.startswith(f"cannot write {out / 'checkpoints' / 'step_000004'}: No space left on device")
    assert f"kept checkpoint {out / 'checkpoints' / 'step_000002'}" in line and "up to step 4" in line
    assert "train.resume=auto" in line
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step_000002"
    assert_nothing_half_written(out)


class FillsAfter(io.TextIOWrapper):
    """metrics.jsonl on a disk that fills after `room` bytes: the row that crosses it is half-written."""
    room = 0

    def write(self, s):
        if FillsAfter.room < len(s):
            super().write(s[:FillsAfter.room // 2])
            raise enospc()
        FillsAfter.room -= len(s)
        return super().write(s)


def test_a_full_disk_while_writing_rows_names_metrics_jsonl_and_keeps_whole_rows(tmp_path, monkeypatch):
    FillsAfter.room = 2500  # the data row, the first train rows

    def opens_filling(path, mode="r", *a, **kw):
        return FillsAfter(open(path, mode.replace("a", "ab") if "b" not in mode else mode))
    monkeypatch.setattr(metrics_mod, "open", opens_filling, raising=False)
    with pytest.raises(ResourceError) as info:
        run(cfg_of(tmp_path, TINY, "train.steps=4"))
    out = tmp_path / "run"
    line = str(info.value)
    assert line.startswith(f"cannot write {out / 'metrics.jsonl'}: No space left on device") and "\n" not in line
    assert "no checkpoint" in line and "kept rows of" in line
    assert_nothing_half_written(out)
    assert out.joinpath("metrics.jsonl").read_text().endswith("}\n")


def test_a_full_disk_at_a_signature_removes_its_temporary_file(tmp_path, monkeypatch):
    save_file = signature.save_file

    def fills(tensors, path, *a, **kw):
        save_file(tensors, path, *a, **kw)   # the temporary file is there, then the rename fails
        raise enospc(path)
    monkeypatch.setattr(signature, "save_file", fills)
    with pytest.raises(ResourceError, match=r"cannot write .*/signatures/w\d+_s0/step_00000000\.safetensors: "
                                            r"No space left on device; kept rows"):
        run(cfg_of(tmp_path, TINY, "train.steps=2"))
    assert_nothing_half_written(tmp_path / "run")


@pytest.mark.parametrize("row", ["[1, 2]", "3", '"train"'])
def test_a_metrics_row_that_is_not_an_object_names_the_file_and_line(tmp_path, row):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"kind": "train", "step": 1, "tokens": 8, "width": 16, "seed": 0}\n' + row + "\n{}\n")
    with pytest.raises(DataError, match=rf"^{f}:2: a JSON \w+, not an object; every line of metrics.jsonl"):
        read_metrics(f)


def test_a_cut_last_row_is_left_out_a_cut_middle_row_is_named(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"kind": "train", "step": 1}\n{"kind": "tr')
    assert read_metrics(f) == [{"kind": "train", "step": 1}]
    f.write_text('{"kind": "tr\n{"kind": "train", "step": 1}\n')
    with pytest.raises(DataError, match=rf"^{f}:1: not JSON"):
        read_metrics(f)


CPU_ALLOCATOR = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("failure", [RuntimeError(CPU_ALLOCATOR), MemoryError()], ids=["torch", "python"])
def test_a_failed_allocation_names_the_planners_estimate_and_the_knobs(tmp_path, monkeypatch, failure):
    def allocation_fails(*a, **kw):
        raise failure
    monkeypatch.setattr(loop, "make_members", allocation_fails)
    with pytest.raises(ResourceError) as info:
        run(cfg_of(tmp_path, TINY, "train.steps=2"))
    line = str(info.value)
    assert line.startswith("out of memory (") and "\n" not in line
    assert "can't allocate memory" in line or isinstance(failure, MemoryError)
    assert "the planner estimates" in line and "per rank for this sweep (2 members, engine none, 1 rank)" in line
    for knob in ("dist.zero_stage", "sweep.widths", "sweep.seeds", "data.batch_size", "train.activation_checkpointing"):
        assert knob in line
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing


def test_an_error_that_is_not_the_machines_keeps_its_traceback(tmp_path, monkeypatch):
    def bug(*a, **kw):
        raise RuntimeError("shape mismatch")
    monkeypatch.setattr(loop, "make_members", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run(cfg_of(tmp_path, TINY, "train.steps=2"))


@pytest.mark.parametrize("state", ["a file", "read-only"])
def test_native_build_with_an_unusable_cache_directory_falls_back_in_one_line(tmp_path, monkeypatch, state, caplog):
    """A cache directory that cannot be made (a file in its place; a read-only file system, which
    root's permission bits would not show, so mkdir is made to fail as it does there): one line,
    no log written anywhere, and available() says False for torch to run."""
    cache = tmp_path / "cache"
    if state == "a file":
        cache.write_text("not a directory")
    else:
        cache.mkdir()

        def read_only(self, *a, **kw):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        monkeypatch.setattr(native.Path, "mkdir", read_only)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("FASTWIDTH_NATIVE_CACHE", raising=False)
    for name, value in (("_ops", None), ("_failure", None)):
        monkeypatch.setattr(native, name, value)
    monkeypatch.delattr(native.available, "_logged", raising=False)
    with caplog.at_level("WARNING", logger="fastwidth.kernels.native"):
        assert native.available() is False
    with pytest.raises(native.UserError) as info:
        native.load()
    line = str(info.value)
    assert line.startswith("native ops unavailable: cache directory ") and "\n" not in line
    assert "FASTWIDTH_NATIVE_CACHE" in line
    assert [r.getMessage() for r in caplog.records] == [f"{line}; kernels=auto runs torch on the CPU"]
    assert (cache.is_file() and cache.read_text() == "not a directory") or list(cache.iterdir()) == []


def _mark(*_):
    pass


@pytest.mark.parametrize("found", [signal.default_int_handler, signal.SIG_IGN, _mark],
                         ids=["default", "ignored (a background job)", "the caller's own"])
def test_a_run_puts_back_the_sigint_handler_it_found(found):
    """Whatever SIGINT did before a run (a background job of a script starts with it ignored),
    it does again after: the stop flag catches Ctrl-C only while it is entered."""
    previous = signal.signal(signal.SIGINT, found)
    try:
        with preempt.StopFlag() as stop:
            stop.armed = True
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal_name == "SIGINT"
        assert signal.getsignal(signal.SIGINT) is found
    finally:
        signal.signal(signal.SIGINT, previous)


def unwritable_cache(tmp_path, monkeypatch, state: str):
    """data.cache_dir unusable: a file in its place, or a read-only file system (mkdir made to fail
    as it does there, since root's permission bits would not)."""
    cache = tmp_path / "cache"
    if state == "a file":
        cache.write_text("x")
    else:
        real_mkdir = os.mkdir

        def read_only(path, *a, **kw):
            if str(path).startswith(str(cache)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_mkdir(path, *a, **kw)
        monkeypatch.setattr(os, "mkdir", read_only)
    return cache


def cache_line(cache, tokens: bool = True) -> str:
    way_out = r", or prepare the tokens once with `fastwidth data prepare" if tokens else "$"
    return rf"^data.cache_dir {cache} cannot be written \(.*\); set data.cache_dir to a writable directory{way_out}"


def text_source(tmp_path, cache):
    from fastwidth.config import DataConfig
    (tmp_path / "corpus.txt").write_text("hello world\n" * 50)
    return DataConfig(source="text", path=str(tmp_path / "corpus.txt"), cache_dir=str(cache))


@pytest.mark.parametrize("state", ["a file", "read-only"])
def test_a_cache_dir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, state):
    """The text sources tokenize into data.cache_dir: one DataError naming it and the way out."""
    from fastwidth.data import prepare_source
    cache = unwritable_cache(tmp_path, monkeypatch, state)
    with pytest.raises(DataError, match=cache_line(cache)):
        prepare_source(text_source(tmp_path, cache))


@pytest.mark.parametrize("state", ["a file", "read-only"])
def test_an_image_sources_unwritable_cache_dir_is_one_line(tmp_path, monkeypatch, state):
    """An image source keeps its normalization statistics in data.cache_dir: the same one line."""
    import numpy as np
    from fastwidth.config import DataConfig
    from fastwidth.data import build_stream
    np.savez(tmp_path / "a.npz", x=np.arange(40 * 30, dtype=np.uint8).reshape(40, 5, 6), y=np.arange(40) % 4)
    cache = unwritable_cache(tmp_path, monkeypatch, state)
    d = DataConfig(source="arrays", path=str(tmp_path / "a.npz"), num_classes=4, batch_size=4, probe_size=3,
                   cache_dir=str(cache))
    with pytest.raises(DataError, match=cache_line(cache, tokens=False)):
        build_stream(d)


@pytest.mark.parametrize("state", ["a file", "read-only"])
def test_the_prepared_shards_check_with_an_unwritable_cache_dir_is_one_line(tmp_path, monkeypatch, state):
    """`data prepare --out` asks whether the shards there are what it would write: the corpus's
    content hash memo goes into data.cache_dir, so the same one line."""
    from fastwidth.data import prepared_shards
    cache = unwritable_cache(tmp_path, monkeypatch, state)
    with pytest.raises(DataError, match=cache_line(cache)):
        prepared_shards(text_source(tmp_path, cache), tmp_path / "shards")


def test_an_engine_writers_wrapped_full_disk_is_the_disks_oserror(tmp_path):
    """torch.distributed.checkpoint wraps each rank's failed write in CheckpointException (a
    BaseException) and safetensors in SafetensorError: both come out as the OSError underneath;
    an error that is not the disk's stays None (its traceback is kept)."""
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException
    from fastwidth.parallel.checkpoints import write_failure
    where = tmp_path / "engine" / "w32_s0"
    wrapped = CheckpointException("save", {0: (RuntimeError("shape"), None), 1: (enospc(), None)})
    got = write_failure(wrapped, where)
    assert isinstance(got, OSError) and got.errno == errno.ENOSPC and got.filename == str(where)
    io_error = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "x" })')
    assert write_failure(io_error, where).errno == errno.ENOSPC
    assert write_failure(CheckpointException("save", {0: (RuntimeError("shape"), None)}), where) is None
    assert write_failure(SafetensorError("invalid dtype"), where) is None


@pytest.mark.parametrize("free", [0, 1 << 20], ids=["full", "not full"])
def test_torch_saves_full_disk_error_is_enospc_only_on_a_full_file_system(tmp_path, monkeypatch, free):
    """torch.save's zip writer on a full disk (measured on a 64 KiB tmpfs) says no errno: ENOSPC
    when the file system has no space left, else not a write failure (a bug keeps its traceback)."""
    from fastwidth.parallel import checkpoints
    real = os.statvfs
    monkeypatch.setattr(checkpoints.os, "statvfs",
                        lambda p: type("S", (), {"f_bavail": free, "f_frsize": real(p).f_frsize})())
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    got = checkpoints.write_failure(err, tmp_path / "not" / "yet")
    if free == 0:
        assert (got.errno, got.filename) == (errno.ENOSPC, str(tmp_path / "not" / "yet"))
    else:
        assert got is None
