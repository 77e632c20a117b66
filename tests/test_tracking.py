"""TensorBoard event files and the CSV carry exactly the rows of metrics.jsonl; train rows carry
the gradient norm before clipping, whether it clipped, tokens per second and peak memory."""
import csv
import struct

import pytest

from fastwidth.trainer.loop import run
from fastwidth.run.metrics import read_metrics
from fastwidth.trainer.tracking import crc32c, masked_crc

from test_train import TINY_MLP, cfg_of


def test_crc32c_known_answer():
    assert crc32c(b"123456789") == 0xE3069283  # the Castagnoli check value (RFC 3720 B.4)
    assert crc32c(b"") == 0


def read_varint(buf, i):
    shift = n = 0
    while True:
        b = buf[i]
        n |= (b & 0x7F) << shift
        i += 1
        shift += 7
        if not b & 0x80:
            return n, i


def fields(buf):
    """(field number, wire type, value) of a protobuf message, decoded independently of the writer."""
    i = 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = read_varint(buf, i)
        elif wire == 1:
            v, i = buf[i:i + 8], i + 8
        elif wire == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            n, i = read_varint(buf, i)
            v, i = buf[i:i + n], i + n
        yield num, wire, v


def read_events(path):
    data, i, events = path.read_bytes(), 0, []
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked_crc(data[i:i + 8])
        payload = data[i + 12:i + 12 + n]
        assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == masked_crc(payload)
        i += 16 + n
        ev = {"scalars": {}}
        for num, _, v in fields(payload):
            if num == 2:
                ev["step"] = v
            elif num == 3:
                ev["file_version"] = v.decode()
            elif num == 5:
                for _, _, value in fields(v):
                    f = {k: x for k, _, x in fields(value)}
                    ev["scalars"][f[1].decode()] = struct.unpack("<f", f[2])[0]
        events.append(ev)
    return events


def test_tensorboard_and_csv_hold_the_metrics_rows(tmp_path):
    run_dir = run(cfg_of(tmp_path, TINY_MLP, "train.steps=6", "train.tensorboard=true", "train.csv=true",
                         "optim.grad_clip=0.05"))
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert all({"grad_norm", "clipped", "peak_mem_bytes"} <= set(r) for r in train)
    assert all(r["clipped"] == (r["grad_norm"] > 0.05) for r in train) and any(r["clipped"] for r in train)
    assert all(r["tokens_per_s"] > 0 for r in train) and all(r["peak_mem_bytes"] > 1e7 for r in train)
    (events_file,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    events = read_events(events_file)
    assert events[0]["file_version"] == "brain.Event:2"
    tb = {(tag, e["step"]): v for e in events[1:] for tag, v in e["scalars"].items()}
    for r in train:
        assert tb[(f"train/loss/w{r['width']}_s{r['seed']}", r["step"])] == pytest.approx(r["loss"], rel=1e-6)
        assert tb[(f"train/clipped/w{r['width']}_s{r['seed']}", r["step"])] == float(r["clipped"])
    evals = [r for r in rows if r["kind"] == "eval"]
    assert all((f"eval/probe_loss/w{r['width']}_s{r['seed']}", r["step"]) in tb for r in evals)
    with open(run_dir / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    by = {(t["kind"], int(t["step"]), int(t["width"]), int(t["seed"]), t["metric"]): float(t["value"]) for t in table}
    for r in train:
        assert by[("train", r["step"], r["width"], r["seed"], "loss")] == r["loss"]  # exact: repr round-trips
        assert by[("train", r["step"], r["width"], r["seed"], "grad_norm")] == r["grad_norm"]


def test_tracking_is_opt_in(tmp_path):
    run_dir = run(cfg_of(tmp_path, TINY_MLP, "train.steps=2"))
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "metrics.csv").exists()
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert all(r["clipped"] is False and r["grad_norm"] > 0 for r in train)  # default clip 1.0 not reached


def test_event_file_reads_in_tensorboard_when_installed(tmp_path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                             reason="tensorboard is not installed; the framing and protobuf are checked above")
    run_dir = run(cfg_of(tmp_path, TINY_MLP, "train.steps=3", "train.tensorboard=true"))
    acc = ea.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train" and r["width"] == 16]
    assert [s.value for s in acc.Scalars("train/loss/w16_s0")] == pytest.approx(losses, rel=1e-6)
