"""train.wandb: the rows of metrics.jsonl as Weights & Biases runs (one per member, grouped by the
run directory's name, x-axis the training step), the report's figures as images, offline
(WANDB_MODE=offline) inside the run directory; refused at start without the package; a failure
inside wandb is one warning and training goes on.

The fast tests route rows through a stand-in wandb module (what is logged where, exactly); one
fast test and the slow ones run the real wandb offline and read its .wandb file back."""
import importlib
import json
import logging
import os
import struct
import sys
import types
from pathlib import Path

import pytest

from fastwidth.cli import main
from fastwidth.errors import UserError
from fastwidth.run.metrics import read_metrics
from fastwidth.trainer import loop, tracking
from fastwidth.trainer.loop import run

from test_train import TINY_MLP, cfg_of

MISSING = "train.wandb needs wandb: pip install 'fastwidth[integrations]' (or pip install wandb)"


# --------------------------------------------------------------------------- a stand-in wandb

class FakeRun:
    def __init__(self, owner, **kw):
        self.owner, self.kw, self.logged, self.finished, self.metrics = owner, kw, [], False, []

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def log(self, data):
        if self.owner.fail_log:
            raise RuntimeError("the W&B service went away")
        self.logged.append(data)

    def finish(self):
        self.finished = True


def fake_wandb(monkeypatch, fail_log=False):
    """A wandb module that records init's arguments and every log call, in sys.modules."""
    wb = types.ModuleType("wandb")
    wb.fail_log, wb.runs, wb.run, wb.torn_down = fail_log, [], None, False
    wb.Settings = lambda **kw: kw
    wb.Image = lambda path: ("image", Path(path).name)

    def init(**kw):
        wb.runs.append(FakeRun(wb, **kw))
        return wb.runs[-1]

    wb.init = init
    wb.teardown = lambda: setattr(wb, "torn_down", True)
    monkeypatch.setitem(sys.modules, "wandb", wb)
    return wb


# --------------------------------------------------------------------------- fast: the plumbing

def test_rows_go_to_their_members_run_and_the_rest_to_the_run_run(tmp_path, monkeypatch):
    wb = fake_wandb(monkeypatch)
    seen = []

    def report(run_dir):  # stands in for the report: one figure, written while every member's run has ended
        seen.append([r.kw["name"] for r in wb.runs if not r.finished])
        (run_dir / "report" / "sub").mkdir(parents=True)
        (run_dir / "report" / "sub" / "loss.png").write_bytes(b"png")

    run_dir = run(cfg_of(tmp_path, TINY_MLP, "train.steps=3", "train.wandb=true", "stats.every=2", "train.report=true"),
                  report=report)
    rows = read_metrics(run_dir / "metrics.jsonl")
    by_name = {r.kw["name"]: r for r in wb.runs}
    assert seen == [["run"]] and by_name["run"].logged[-1] == {"step": 3, "figures/sub/loss": ("image", "loss.png")}
    assert set(by_name) == {"w16_s0", "w32_s0", "run"} and len(wb.runs) == 3
    for name, r in by_name.items():
        assert r.kw["group"] == run_dir.name and r.kw["project"] == "fastwidth" and r.kw["resume"] == "allow"
        assert r.kw["id"] == tracking.wandb_id(run_dir, name) and r.kw["dir"] == str(run_dir)
        assert r.kw["config"]["train"]["steps"] == 3 and r.kw["settings"]["console"] == "off"
        assert ("*", "step") in r.metrics and r.finished
    assert by_name["w16_s0"].kw["config"]["member"] == {"width": 16, "seed": 0}
    for name in ("w16_s0", "w32_s0"):  # every train row, as logged: step and loss exactly
        width = int(name[1:3])
        want = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train" and r["width"] == width]
        got = [(d["step"], d["train/loss"]) for d in by_name[name].logged if "train/loss" in d]
        assert got == want and len(want) == 3
        evals = [(r["step"], r["probe_loss"]) for r in rows if r["kind"] == "eval" and r["width"] == width]
        assert [(d["step"], d["eval/probe_loss"]) for d in by_name[name].logged if "eval/probe_loss" in d] == evals
    keys = {k for d in by_name["run"].logged for k in d}
    assert "run/wall_s/w0_s0" in keys and "ensemble/params/w16_s-1" in keys and "memory/host_peak_bytes/w0_s0" in keys
    assert not any(k.startswith(("train/", "eval/")) for k in keys)  # member rows stay in member runs
    assert wb.torn_down  # no other W&B run of the process: the service goes too


def test_resume_continues_the_same_wandb_runs(tmp_path, monkeypatch):
    wb = fake_wandb(monkeypatch)
    run(cfg_of(tmp_path, TINY_MLP, "train.steps=2", "train.wandb=true", "sweep.widths=[16]", "stats.enabled=false"))
    first = {r.kw["name"]: r.kw["id"] for r in wb.runs}
    wb.runs.clear()
    run(cfg_of(tmp_path, TINY_MLP, "train.steps=4", "train.wandb=true", "sweep.widths=[16]", "stats.enabled=false",
               "train.resume=true"))
    assert {r.kw["name"]: r.kw["id"] for r in wb.runs} == first and set(first) == {"w16_s0", "run"}
    assert [d["step"] for d in wb.runs[[r.kw["name"] for r in wb.runs].index("w16_s0")].logged
            if "train/loss" in d] == [3, 4]


def test_only_the_main_rank_logs_to_wandb(tmp_path, monkeypatch):
    wb = fake_wandb(monkeypatch)
    cfg = cfg_of(tmp_path, TINY_MLP, "train.wandb=true")
    row = {"kind": "train", "step": 1, "tokens": 8, "width": 16, "seed": 0, "loss": 1.0}
    for main_rank in (False, True):
        (tmp_path / f"r{main_rank}").mkdir()
        writer = tracking.open_writer(tmp_path / f"r{main_rank}", cfg.train, cfg=cfg, main=main_rank)
        writer.write(row)
        writer.close()
        tracking.finish(writer)
    assert [r.kw["dir"] for r in wb.runs] == [str(tmp_path / "rTrue")] and wb.runs[0].logged[0]["train/loss"] == 1.0


def test_wandb_member_and_ids():
    assert tracking.wandb_member({"width": 16, "seed": 0}) == "w16_s0"
    assert tracking.wandb_member({"width": 64, "seed": 2, "base_lr": 0.001, "depth": 4}) == "w64_d4_lr0.001_s2"
    assert tracking.wandb_member({"width": 0, "seed": 0}) is None        # the run's own rows
    assert tracking.wandb_member({"width": 16, "seed": -1}) is None      # across seeds (ensemble)
    a, b = tracking.wandb_id(Path("/x/run1"), "w16_s0"), tracking.wandb_id(Path("/y/run1"), "w16_s0")
    assert a != b and a == tracking.wandb_id(Path("/x/run1"), "w16_s0") and a.startswith("run1-w16_s0-")
    odd = tracking.wandb_id(Path("/x/a b:c"), "w64_lr0.001_s0")
    assert all(c.isalnum() or c in "-_" for c in odd) and len(odd) <= 64


def test_a_wandb_failure_is_one_warning_and_training_goes_on(tmp_path, monkeypatch, caplog):
    wb = fake_wandb(monkeypatch, fail_log=True)
    with caplog.at_level(logging.WARNING, logger="fastwidth.trainer"):
        run_dir = run(cfg_of(tmp_path, TINY_MLP, "train.steps=3", "train.wandb=true"))
    warned = [r.getMessage() for r in caplog.records if "train.wandb" in r.getMessage()]
    assert len(warned) == 1 and "the W&B service went away" in warned[0] and "training goes on" in warned[0]
    assert len([r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]) == 6
    assert all(r.finished for r in wb.runs)


def test_without_wandb_refused_at_start_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    monkeypatch.setattr(loop, "make_members", lambda *a, **k: pytest.fail("a model was built before the refusal"))
    cfg = cfg_of(tmp_path, TINY_MLP, "train.steps=2", "train.wandb=true")
    with pytest.raises(UserError) as e:
        run(cfg)
    assert str(e.value) == MISSING and not (tmp_path / "run").exists()  # refused before anything is written
    out, config = tmp_path / "cli", tmp_path / "tiny.yaml"
    config.write_text("train:\n  wandb: true\n")
    assert main(["train", "--config", str(config), "--set", *TINY_MLP, f"train.out_dir={out}",
                 f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"fastwidth: error: {MISSING}"] and not out.exists()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "wandb", None)
    run_dir = run(cfg_of(tmp_path, TINY_MLP, "train.steps=2", out="off"))  # train.wandb=false needs no wandb
    assert not (run_dir / "wandb").exists()


def test_tracking_does_not_import_wandb(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would raise
    monkeypatch.delitem(sys.modules, "fastwidth.trainer.tracking")
    fresh = importlib.import_module("fastwidth.trainer.tracking")
    assert fresh.open_writer and sys.modules["wandb"] is None


# --------------------------------------------------------------------------- the real wandb, offline

def wandb_records(path: Path) -> list:
    """The records of a .wandb file, read independently of wandb's writer: a ':W&B' header (7
    bytes), then LevelDB log framing (32 KiB blocks; each chunk: crc32c, uint16 length, type
    FULL 1 / FIRST 2 / MIDDLE 3 / LAST 4) around wandb_internal_pb2.Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    i, buf, out = 7, b"", []
    while i + 7 <= len(data):
        length, kind = struct.unpack("<HB", data[i + 4:i + 7])
        if block - i % block < 7 or kind == 0:  # a block's zero-filled tail
            i += block - i % block
            continue
        buf, i = (b"" if kind in (1, 2) else buf) + data[i + 7:i + 7 + length], i + 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def offline_runs(run_dir: Path) -> dict:
    """{display name: (run record, [history dicts])} of every offline run under RUN/wandb."""
    out = {}
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        recs = wandb_records(f)
        (head,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
        history = [{(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in r.history.item}
                   for r in recs if r.WhichOneof("record_type") == "history"]
        out.setdefault(head.display_name, []).append((head, history, f))
    return out


def wandb_core_children() -> list[int]:
    """This process's wandb-core children still running (zombies excluded)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            comm, rest = fields[0].split("(", 1)[1], fields[1].split()
        except (OSError, IndexError):
            continue
        if comm.startswith("wandb-core") and int(rest[1]) == os.getpid() and rest[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow  # wandb's import and two run starts: about 5 s
def test_offline_sink_writes_rows_and_figures_inside_the_run(tmp_path, monkeypatch, capfd):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_CACHE_DIR", raising=False)
    cfg = cfg_of(tmp_path, TINY_MLP, "train.steps=2", "train.wandb=true")
    run_dir = tmp_path / "run"
    (run_dir / "report").mkdir(parents=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.figure(figsize=(1, 1))
    plt.savefig(run_dir / "report" / "loss.png")
    plt.close("all")
    sink = tracking.WandbSink(cfg, run_dir)
    rows = [{"kind": "train", "step": s, "tokens": 8 * s, "width": 16, "seed": 0, "loss": 1.0 / s} for s in (1, 2)]
    rows.append({"kind": "run", "step": 2, "tokens": 16, "width": 0, "seed": 0, "wall_s": 0.5})
    for r in rows:
        sink.write(r)
    sink.close()
    sink.log_figures(run_dir / "report")
    assert wandb_core_children()  # the service runs while a W&B run is open (the check below can fail)
    sink.finish()
    runs = offline_runs(run_dir)
    assert set(runs) == {"w16_s0", "run"}
    (head, history, _), = runs["w16_s0"]
    assert head.run_group == "run" and head.run_id == tracking.wandb_id(run_dir, "w16_s0")
    assert [(h["step"], h["train/loss"]) for h in history] == [(1, 1.0), (2, 0.5)]
    (head, history, f), = runs["run"]
    assert history[0]["run/wall_s/w0_s0"] == 0.5 and history[1]["figures/loss/_type"] == "image-file"
    assert list(f.parent.glob("files/media/images/figures/loss_*.png"))
    assert not sink.failed and wandb_core_children() == []  # finished, and the service stopped
    err = capfd.readouterr().err
    assert "wandb" not in err.lower()  # silent: nothing on the progress bar's stream


@pytest.mark.slow
def test_offline_training_run_and_its_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_CACHE_DIR", raising=False)
    base = ["train.wandb=true", "train.report=false", "stats.every=2"]
    run_dir = run(cfg_of(tmp_path, TINY_MLP, "train.steps=3", *base))
    run(cfg_of(tmp_path, TINY_MLP, "train.steps=5", "train.resume=true", *base))
    rows = read_metrics(run_dir / "metrics.jsonl")
    runs = offline_runs(run_dir)
    assert set(runs) == {"w16_s0", "w32_s0", "run"}
    for name in ("w16_s0", "w32_s0"):
        first, resumed = runs[name]  # two offline directories, one W&B run id: the resume continues it
        assert first[0].run_id == resumed[0].run_id == tracking.wandb_id(run_dir, name)
        logged = [(h["step"], h["train/loss"]) for _, history, _ in runs[name] for h in history if "train/loss" in h]
        width = int(name[1:3])
        assert logged == [(r["step"], r["loss"]) for r in rows if r["kind"] == "train" and r["width"] == width]
    sizes = {p.name: p.stat().st_size for p in (run_dir / "wandb").rglob("*") if p.is_file()}
    assert all(n > 0 for k, n in sizes.items() if k.endswith(".wandb"))
    assert wandb_core_children() == []
