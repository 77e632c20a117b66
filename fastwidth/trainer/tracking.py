"""Tracking as researchers use it: the rows of metrics.jsonl also as TensorBoard scalars, a CSV
and Weights & Biases runs.

All are opt-in (train.tensorboard, train.csv, train.wandb) and fed the very rows metrics.jsonl
gets, so they never disagree:
    RUN/tensorboard/events.out.tfevents.*   tag "<kind>/<metric>/w<width>_s<seed>", step = step
    RUN/metrics.csv                         long format: kind, step, tokens, width, seed, labels,
                                            metric, value (one numeric value a line; nested
                                            dicts flattened as "a/b"; labels = the row's strings)
    RUN/wandb/                              W&B's own run directories (offline-run-* or run-*):
                                            one W&B run per member, named by it ("w64_s0"), and
                                            one named "run" for the rows of no member (width 0,
                                            seed -1) and the report's figures; all grouped by
                                            the run directory's name; key "<kind>/<metric>",
                                            x-axis the training step
The TensorBoard file is written here directly (TFRecord framing around Event protobufs, the
format of tensorboard's own EventFileWriter), so no tensorboard or protobuf package is needed;
`tensorboard --logdir RUN/tensorboard` reads it. Train rows also carry throughput and peak
memory (`Throughput.extras`) and the gradient norm (`grad_fields`).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import logging
import math
import os
import re
import socket
import struct
import time
from pathlib import Path

from fastwidth.errors import UserError
from fastwidth.run.members import MemberSpec
from fastwidth.run.metrics import REQUIRED, MetricsWriter
from fastwidth.run.paths import RunDir

log = logging.getLogger("fastwidth.trainer")

# --------------------------------------------------------------------------- TensorBoard records


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """TFRecord's checksum: crc32c rotated right by 15 plus a constant (tensorflow/core/lib/hash/crc32c.h)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event_bytes(wall_time: float, step: int, *, file_version: str | None = None,
                scalars: dict[str, float] | None = None) -> bytes:
    """An Event protobuf: wall_time (1, double), step (2, int64), file_version (3) or summary (5)
    holding Summary.Value{tag (1), simple_value (2, float)} per scalar."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(_field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", v))
                          for tag, v in scalars.items())
        out += _field_bytes(5, values)
    return out


def record_bytes(data: bytes) -> bytes:
    """TFRecord framing: length (uint64), its masked crc, data, the data's masked crc."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._f = open(log_dir / name, "ab")
        self._f.write(record_bytes(event_bytes(time.time(), 0, file_version="brain.Event:2")))
        self._f.flush()

    def write(self, row: dict) -> None:
        scalars = {f"{row['kind']}/{k}/w{row['width']}_s{row['seed']}": v for k, v in numeric_items(row)}
        if scalars:
            self._f.write(record_bytes(event_bytes(time.time(), int(row["step"]), scalars=scalars)))
            self._f.flush()

    def close(self) -> None:
        self._f.close()


# --------------------------------------------------------------------------- CSV

CSV_COLUMNS = ("kind", "step", "tokens", "width", "seed", "labels", "metric", "value")


def numeric_items(row: dict, prefix: str = ""):
    """(name, float) for every finite number of a row outside the identifying columns; nested
    dicts are flattened with '/' and booleans count as 0/1."""
    for k, v in row.items():
        if not prefix and k in REQUIRED:
            continue
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from numeric_items(v, name + "/")
        elif isinstance(v, (int, float)) and (isinstance(v, bool) or math.isfinite(v)):
            yield name, float(v)


class CsvSink:
    def __init__(self, path: Path):
        new = not path.exists()
        self._f = open(path, "a", newline="")
        self._csv = csv.writer(self._f)
        if new:
            self._csv.writerow(CSV_COLUMNS)

    def write(self, row: dict) -> None:
        labels = ";".join(f"{k}={v}" for k, v in row.items() if isinstance(v, str) and k not in REQUIRED)
        ids = [row[k] for k in REQUIRED]
        self._csv.writerows([*ids, labels, name, repr(v)] for name, v in numeric_items(row))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# --------------------------------------------------------------------------- Weights & Biases

WANDB_MISSING = "train.wandb needs wandb: pip install 'fastwidth[integrations]' (or pip install wandb)"
RUN_LEVEL = "run"    # the W&B run of the rows of no member and of the report's figures


def import_wandb():
    """The wandb module, or the one-line refusal (exit 2) when it is not installed. Imported here
    only: with train.wandb false nothing imports wandb."""
    try:
        import wandb
    except ImportError:
        raise UserError(WANDB_MISSING) from None
    return wandb


def check_wandb(train_cfg) -> None:
    """train.wandb without the package: refused before anything is built or written."""
    if train_cfg.wandb:
        import_wandb()


def wandb_member(row: dict) -> str | None:
    """The member a row belongs to (run/members.py's name), None for the rows of no member:
    the run's own (width 0: data, memory, fit, run) and the across-seed ones (seed -1: ensemble)."""
    if row["width"] <= 0 or row["seed"] < 0:
        return None
    return MemberSpec(row["width"], row.get("base_lr"), row["seed"], row.get("depth")).name


def wandb_id(run_dir: Path, name: str) -> str:
    """A W&B run id that a resume of the same run directory finds again: the directory's name and
    the member's, made safe, and a hash of the directory's absolute path and the member."""
    digest = hashlib.sha1(f"{Path(run_dir).resolve()}\0{name}".encode()).hexdigest()[:10]
    readable = re.sub(r"[^A-Za-z0-9_-]", "-", f"{Path(run_dir).name}-{name}")[:50]
    return f"{readable}-{digest}"


class WandbSink:
    """train.wandb on rank 0: each row goes to its member's W&B run ("<kind>/<metric>", with the
    row's step as x-axis; rows reach a run out of step order in a sequential sweep and after a
    resume, so the step is a logged key and not W&B's own step counter), rows of no member to the
    "run" run with the TensorBoard tag's "/w<width>_s<seed>" suffix. Runs start as their first row
    comes, with resume="allow" under wandb_id, so train.resume continues them. A failure inside
    wandb is one warning line, after which W&B logging stops and training goes on."""

    def __init__(self, cfg, run_dir: Path):
        self.wandb = import_wandb()
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.runs: dict = {}
        self.failed = False
        self._owns_service = self.wandb.run is None  # no other W&B run of this process: ours to stop

    def _safely(self, what: str, fn, *args) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except Exception as e:  # W&B's own failure (network, disk, a bug): never the run's
            self.failed = True
            log.warning("train.wandb: W&B %s failed (%s: %s); training goes on, the rows stay in "
                        "metrics.jsonl", what, type(e).__name__, str(e).splitlines()[0] if str(e) else "")

    def _run(self, name: str):
        if name not in self.runs:
            spec = {} if name == RUN_LEVEL else \
                {"member": {k: v for k, v in dataclasses.asdict(MemberSpec.parse(name)).items() if v is not None}}
            settings = self.wandb.Settings(console="off", silent=True, x_disable_stats=True)
            with _cache_inside(RunDir(self.run_dir).wandb):  # wandb-core's log: inside the run directory
                run = self.wandb.init(project=self.cfg.train.wandb_project, group=self.run_dir.name,
                                      name=name, id=wandb_id(self.run_dir, name), resume="allow",
                                      job_type="run" if name == RUN_LEVEL else "member",
                                      dir=str(self.run_dir), reinit="create_new", settings=settings,
                                      config={**self.cfg.to_dict(), **spec})
            run.define_metric("step")
            run.define_metric("*", step_metric="step")
            self.runs[name] = run
        return self.runs[name]

    def write(self, row: dict) -> None:
        self._safely("logging", self._log, row)

    def _log(self, row: dict) -> None:
        name = wandb_member(row)
        tag = "" if name else f"/w{row['width']}_s{row['seed']}"
        values = {f"{row['kind']}/{k}{tag}": v for k, v in numeric_items(row)}
        if values:
            self._run(name or RUN_LEVEL).log({"step": int(row["step"]), "tokens": row["tokens"], **values})

    def log_figures(self, report_dir: Path) -> None:
        """The report's figures (report/**/*.png) as images of the "run" run: they compare every
        width and seed, so they belong to the run as a whole, not to one member."""
        figures = sorted(Path(report_dir).rglob("*.png"))
        if figures:
            self._safely("figure logging", self._log_figures, report_dir, figures)

    def _log_figures(self, report_dir: Path, figures: list[Path]) -> None:
        images = {f"figures/{p.relative_to(report_dir).with_suffix('').as_posix()}": self.wandb.Image(str(p))
                  for p in figures}
        self._run(RUN_LEVEL).log({"step": self.cfg.train.steps, **images})

    def close(self) -> None:
        """The members' runs end with the rows; the "run" run waits for the report (finish)."""
        for name in [n for n in self.runs if n != RUN_LEVEL]:
            self._finish(name)

    def finish(self) -> None:
        """Every run still open ends, and wandb's service process with them when no other W&B run
        of this process needs it."""
        for name in list(self.runs):
            self._finish(name)
        if self._owns_service and self.wandb.run is None:
            with contextlib.suppress(Exception):
                self.wandb.teardown()

    def _finish(self, name: str) -> None:
        run = self.runs.pop(name)
        try:
            run.finish()
        except Exception as e:  # after a failure already warned about, quietly
            (log.debug if self.failed else log.warning)("train.wandb: finishing W&B run %s failed (%s: %s)",
                                                        name, type(e).__name__, e)


@contextlib.contextmanager
def _cache_inside(root: Path):
    """WANDB_CACHE_DIR inside the run directory while a W&B run starts (wandb-core writes its debug
    log there), unless the user set it."""
    if "WANDB_CACHE_DIR" in os.environ:
        yield
        return
    os.environ["WANDB_CACHE_DIR"] = str(root / "cache")
    try:
        yield
    finally:
        os.environ.pop("WANDB_CACHE_DIR", None)


# --------------------------------------------------------------------------- the writer

class TrackedWriter(MetricsWriter):
    """metrics.jsonl plus the sinks, each fed every row after it is written to the JSON lines."""

    def __init__(self, path: Path, sinks: list):
        super().__init__(path)
        self.sinks = sinks

    def write(self, row: dict) -> None:
        super().write(row)
        for sink in self.sinks:
            sink.write(row)

    def close(self) -> None:
        super().close()
        for sink in self.sinks:
            sink.close()


def open_writer(run_dir: Path, train_cfg, *, cfg=None, main: bool = True) -> MetricsWriter:
    """The run's metrics writer: metrics.jsonl, and TensorBoard / CSV / W&B when the config asks
    (W&B only on the main rank, and given the whole config `cfg`, which its runs record)."""
    run, sinks = RunDir(run_dir), []
    if train_cfg.tensorboard:
        sinks.append(TensorBoardSink(run.tensorboard))
    if train_cfg.csv:
        sinks.append(CsvSink(run.metrics_csv))
    if train_cfg.wandb and main and cfg is not None:
        sinks.append(WandbSink(cfg, run_dir))
    path = run.metrics
    return TrackedWriter(path, sinks) if sinks else MetricsWriter(path)


def _wandb_sinks(writer) -> list[WandbSink]:
    return [s for s in getattr(writer, "sinks", ()) if isinstance(s, WandbSink)]


def log_report(writer, run_dir: Path) -> None:
    """After the report: its figures to W&B (train.wandb), nothing otherwise."""
    for sink in _wandb_sinks(writer):
        sink.log_figures(RunDir(run_dir).report)


def finish(writer) -> None:
    """The end of a run, however it ends: every W&B run still open finishes (train.wandb)."""
    for sink in _wandb_sinks(writer):
        sink.finish()


# --------------------------------------------------------------------------- train-row extras

class Throughput:
    """Tokens per second of wall time between two logged steps, and the peak memory so far."""

    def __init__(self, tokens_per_step: int, device, start_step: int):
        self.tokens_per_step, self.device = tokens_per_step, device
        self._t, self._step = time.perf_counter(), start_step

    def extras(self, step: int) -> dict:
        now = time.perf_counter()
        out = {}
        if self._step is not None and step > self._step and now > self._t:
            out["tokens_per_s"] = (step - self._step) * self.tokens_per_step / (now - self._t)
        self._t, self._step = now, step
        out["peak_mem_bytes"] = peak_memory_bytes(self.device)
        return out


def peak_memory_bytes(device) -> int:
    """Peak CUDA memory allocated on a GPU; the process's peak resident set size on the CPU."""
    import torch
    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def grad_fields(grad_norm, max_norm: float) -> dict:
    if grad_norm is None:  # a sharding engine clips inside its own step
        return {}
    norm = float(grad_norm)
    return {"grad_norm": norm, "clipped": bool(max_norm > 0 and norm > max_norm)}
