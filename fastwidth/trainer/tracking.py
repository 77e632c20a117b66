"""Tracking as researchers use it: the rows of metrics.jsonl also as TensorBoard scalars and a CSV.

Both are opt-in (train.tensorboard, train.csv) and fed the very rows metrics.jsonl gets, so the
three never disagree:
    RUN/tensorboard/events.out.tfevents.*   tag "<kind>/<metric>/w<width>_s<seed>", step = step
    RUN/metrics.csv                         long format: kind, step, tokens, width, seed, labels,
                                            metric, value (one numeric value a line; nested
                                            dicts flattened as "a/b"; labels = the row's strings)
The TensorBoard file is written here directly (TFRecord framing around Event protobufs, the
format of tensorboard's own EventFileWriter), so no tensorboard or protobuf package is needed;
`tensorboard --logdir RUN/tensorboard` reads it. Train rows also carry throughput and peak
memory (`Throughput.extras`) and the gradient norm (`grad_fields`).
"""
from __future__ import annotations

import csv
import math
import os
import socket
import struct
import time
from pathlib import Path

from fastwidth.run.metrics import REQUIRED, MetricsWriter
from fastwidth.run.paths import RunDir

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


def open_writer(run_dir: Path, train_cfg) -> MetricsWriter:
    """The run's metrics writer: metrics.jsonl, and TensorBoard / CSV when the config asks."""
    run, sinks = RunDir(run_dir), []
    if train_cfg.tensorboard:
        sinks.append(TensorBoardSink(run.tensorboard))
    if train_cfg.csv:
        sinks.append(CsvSink(run.metrics_csv))
    path = run.metrics
    return TrackedWriter(path, sinks) if sinks else MetricsWriter(path)


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
