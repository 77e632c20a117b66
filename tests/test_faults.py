"""Fault injection: each way a run can be started wrong, stopped or cut, and what it must do.

Two runs into one directory, Ctrl-C, a key given twice, data that cannot be right, reports on
partial runs, the nearest-key hint and the torch-free config check, the README's install, and a
rank killed while a checkpoint is being written on 2 ranks. Multi-process training cases are slow.
"""
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fastwidth.config import DataConfig, _nearest, read_yaml
from fastwidth.errors import ConfigError, DataError, UserError
from fastwidth.run import checkpoint as ckpt
from fastwidth.run import lock as run_lock
from fastwidth.trainer import loop
from fastwidth.trainer.loop import run
from fastwidth.run.metrics import read_metrics
from fastwidth.trainer.preempt import Preempted

from test_train import ROOT, TINY_MLP, cfg_of, train_losses

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------ 1. the run-directory lock

def test_a_held_directory_is_refused_naming_its_owner(tmp_path):
    with run_lock.RunLock(tmp_path / "run") as held:
        assert held.made == tmp_path / "run"
        owner = json.loads((tmp_path / "run" / ".lock").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()} on "):
            with run_lock.RunLock(tmp_path / "run"):
                pass
        assert (tmp_path / "run" / ".lock").is_file()  # the refused one touched nothing
    assert not (tmp_path / "run" / ".lock").exists()  # released: the file goes with the lock


def test_a_dead_owners_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    with caplog.at_level(logging.WARNING, logger="fastwidth.run"):
        with run_lock.RunLock(tmp_path):
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over the lock left by pid {dead.pid}" in caplog.text and "no longer running" in caplog.text


def test_a_failed_start_removes_only_what_it_made(tmp_path):
    """A run made out_dir and fails in set-up: out_dir goes. A run in an existing directory fails:
    only its new entries go, what was there stays, and so does a file another process wrote there
    before the snapshot."""
    with pytest.raises(RuntimeError):
        with run_lock.RunLock(tmp_path / "a" / "b") as lock, run_lock.undo_on_error(tmp_path / "a" / "b", made=lock.made):
            (tmp_path / "a" / "b" / "metrics.jsonl").write_text("{}\n")
            raise RuntimeError("set-up failed")
    assert not (tmp_path / "a").exists()
    keep = tmp_path / "old"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with run_lock.RunLock(keep) as lock, run_lock.undo_on_error(keep, made=lock.made):
            (keep / "config.yaml").write_text("x")
            raise RuntimeError("set-up failed")
    assert sorted(p.name for p in keep.iterdir()) == ["notes.txt"]
    (keep / ".rank1").mkdir()
    with pytest.raises(RuntimeError):  # a rank other than 0 removes only its scratch directory
        with run_lock.undo_on_error(keep, only=[keep / ".rank1"]):
            (keep / "rank0.txt").write_text("rank 0's")
            raise RuntimeError("set-up failed")
    assert sorted(p.name for p in keep.iterdir()) == [".rank1", "notes.txt", "rank0.txt"]


TAKE_LOCK = """
import os, sys, time
sys.path.insert(0, {root!r})
from fastwidth.errors import UserError
from fastwidth.run.lock import RunLock
while not os.path.exists({go!r}):
    time.sleep(0.002)
try:
    with RunLock({out!r}):
        time.sleep(0.3)
except UserError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.slow  # launches processes (4 s)
def test_two_processes_started_together_one_wins_every_time(tmp_path):
    """The minimal entry (take the lock, hold it, exit), two at once, 8 rounds: exactly one gets the
    directory, the other exits 2 with one line naming the winner's pid."""
    for k in range(8):
        go, out = tmp_path / f"go{k}", tmp_path / f"run{k}"
        script = TAKE_LOCK.format(root=str(ROOT), go=str(go), out=str(out))
        procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True) for _ in range(2)]
        time.sleep(0.15)  # both are importing, then waiting for go
        go.write_text("")
        results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
        codes = sorted(rc for rc, _ in results)
        assert codes == [0, 2], results
        winner = next(p.pid for p, (rc, _) in zip(procs, results) if rc == 0)
        err = next(e for rc, e in results if rc == 2)
        assert f"pid {winner} on" in err and len(err.strip().splitlines()) == 1, err
        assert list(out.iterdir()) == []  # the winner removed its lock file on leaving


def empty_config(where: Path) -> Path:
    (where / "empty.yaml").write_text("{}\n")  # built-in defaults and the --set keys
    return where / "empty.yaml"


def launch_train(sets, cfg, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(cfg), "--set", *sets],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_two_real_launches_into_one_directory(tmp_path):
    """Two training processes started together, 3 times: one trains (every row once), the other
    exits 2 with one line, and nothing of the first is lost."""
    for k in range(3):
        out = tmp_path / f"run{k}"
        sets = [*TINY_MLP, f"train.out_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=12"]
        procs = [launch_train(sets, empty_config(tmp_path)), launch_train(sets, empty_config(tmp_path))]
        results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
        assert sorted(rc for rc, _ in results) == [0, 2], [(rc, e[-1500:]) for rc, e in results]
        err = next(e for rc, e in results if rc == 2)
        assert "is in use by another run (pid" in err and "Traceback" not in err
        rows = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
        assert len(rows) == 12 * 2 and (out / "config.yaml").is_file() and (out / "probe.safetensors").is_file()
        assert ckpt.latest_checkpoint(out / "checkpoints").name == "step_000012"
        assert not (out / ".lock").exists()


# ------------------------------------------------------------------------------ 2. Ctrl-C

def signal_in_step(monkeypatch, at_step, sig=signal.SIGINT, times=1):
    step_of = loop.Trainer.train_step

    def train_step_then_signal(self, m, x, y):
        if m.step == at_step and m is self.members[0]:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return step_of(self, m, x, y)
    monkeypatch.setattr(loop.Trainer, "train_step", train_step_then_signal)
    return step_of


def test_ctrl_c_finishes_the_step_checkpoints_and_exits_130(tmp_path, monkeypatch):
    step_of = signal_in_step(monkeypatch, at_step=4)
    before = signal.getsignal(signal.SIGINT)   # default_int_handler, or SIG_IGN under a background shell
    with pytest.raises(Preempted) as info:
        run(cfg_of(tmp_path, TINY_MLP, "train.steps=10"))
    assert info.value.exit_code == 130 and info.value.signal_name == "SIGINT" and info.value.step == 5
    assert "train.resume=auto" in str(info.value)
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_000005"
    assert signal.getsignal(signal.SIGINT) is before                  # the handler it found is restored
    monkeypatch.setattr(loop.Trainer, "train_step", step_of)
    resumed = run(cfg_of(tmp_path, TINY_MLP, "train.steps=10", "train.resume=auto"))  # what the line advises
    assert max(step for _, _, step in train_losses(resumed)) == 10  # bit-equality: test_preempt.py


def test_a_second_ctrl_c_aborts_and_the_same_command_starts_over(tmp_path, monkeypatch):
    step_of = signal_in_step(monkeypatch, at_step=2, times=2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_of(tmp_path, TINY_MLP, "train.steps=6"))
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") is None  # no waiting for one
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    monkeypatch.setattr(loop.Trainer, "train_step", step_of)
    again = run(cfg_of(tmp_path, TINY_MLP, "train.steps=6"))  # the same command: starts over
    rows = [r for r in read_metrics(again / "metrics.jsonl") if r["kind"] == "train"]
    assert sorted((r["width"], r["step"]) for r in rows) == sorted((w, s) for w in (16, 32) for s in range(1, 7))
    with pytest.raises(UserError, match="already holds a run"):  # a run with a checkpoint is kept
        run(cfg_of(tmp_path, TINY_MLP, "train.steps=6"))


@pytest.mark.slow
def test_ctrl_c_from_outside(tmp_path):
    out = tmp_path / "run"
    sets = [*TINY_MLP, f"train.out_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=100000"]
    proc = launch_train(sets, empty_config(tmp_path))
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file()
                                          and '"kind": "train"' in (out / "metrics.jsonl").read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "SIGINT received: stopped after step" in err and "Traceback" not in err, err
    assert ckpt.latest_checkpoint(out / "checkpoints") is not None and not (out / ".lock").exists()


# ------------------------------------------------------------------------------ 3. duplicate YAML keys

def test_a_key_given_twice_names_it_and_both_lines(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 3\n  report: false\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"key 'train.steps' is given twice, at lines 2 and 4"):
        read_yaml(f)
    f2 = tmp_path / "merge.yaml"  # a merge key may repeat what it merges
    f2.write_text("base: &b {lr: 1}\noptim:\n  <<: *b\n  lr: 2\n")
    assert read_yaml(f2)["optim"] == {"lr": 2}
    from fastwidth.cli import main
    assert main(["train", "--config", str(f), "--set", f"train.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "given twice" in err[0] and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ 4. data sanity

def test_random_bytes_as_a_text_corpus_are_refused(tmp_path):
    from fastwidth.data import build_stream
    (tmp_path / "noise.txt").write_bytes(np.random.default_rng(0).bytes(200_000))
    d = DataConfig(source="text", path=str(tmp_path / "noise.txt"), cache_dir=str(tmp_path / "c"), seq_len=16,
                   batch_size=4, probe_size=4)
    with pytest.raises(DataError, match=r"noise.txt: \d+% of its first 195 KB are not UTF-8 text.*max_undecodable"):
        build_stream(d)
    d.max_undecodable = 1.0  # the documented way to train on it anyway
    assert build_stream(d).vocab_size >= 256
    (tmp_path / "latin.txt").write_bytes(("Le café est très bon. " * 2000).encode("latin-1"))
    with pytest.raises(DataError, match="latin.txt"):  # 3 of 22 bytes: 14%
        build_stream(DataConfig(source="text", path=str(tmp_path / "latin.txt"), cache_dir=str(tmp_path / "c")))
    (tmp_path / "utf8.txt").write_text("Le café est très bon. " * 2000)
    build_stream(DataConfig(source="text", path=str(tmp_path / "utf8.txt"), cache_dir=str(tmp_path / "c"),
                            seq_len=16, batch_size=4, probe_size=4))


def test_fewer_classes_than_the_model_assumes_are_refused(tmp_path):
    from PIL import Image

    from fastwidth.data import build_stream
    for i in range(12):
        (tmp_path / "one" / "cat").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 6), (20 * i, 0, 0)).save(tmp_path / "one" / "cat" / f"{i}.png")
    d = DataConfig(source="imagefolder", path=str(tmp_path / "one"), num_classes=10, batch_size=2, probe_size=2,
                   cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"hold 1 of data.num_classes=10 classes \(cat\).*allow_missing_classes"):
        build_stream(d)
    np.savez(tmp_path / "a.npz", x=np.zeros((30, 4), np.float32), y=np.arange(30) % 3)
    d = DataConfig(source="arrays", path=str(tmp_path / "a.npz"), num_classes=4, batch_size=2, probe_size=2)
    with pytest.raises(DataError, match=r"hold 3 of data.num_classes=4 classes \(0, 1, 2\)"):
        build_stream(d)
    d.allow_missing_classes = True
    assert build_stream(d).num_classes == 4
    np.savez(tmp_path / "b.npz", x=np.zeros((30, 4), np.float32), y=np.arange(30) % 5)
    with pytest.raises(DataError, match=r"label 4 is outside the class range \[0, 4\)"):
        build_stream(DataConfig(source="arrays", path=str(tmp_path / "b.npz"), num_classes=4))


# ------------------------------------------------------------------------------ 5. reports on partial runs

def test_partial_note_says_what_is_missing(tmp_path):
    from fastwidth.report.reader import load_run
    rows = [{"kind": "train", "step": s, "tokens": 8 * s, "width": 16, "seed": 0, "loss": 1.0} for s in (1, 2, 3)]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": 10}, "stats": {"enabled": False}}))
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"kind": "train", "st')
    assert load_run(tmp_path).partial == ("metrics.jsonl ends in a cut line (21 bytes, left out); "
                                          "unfinished: train rows up to step 3 of train.steps=10")
    stop = {"kind": "preempted", "step": 3, "tokens": 24, "width": 0, "seed": 0, "signal": "SIGINT"}
    (tmp_path / "metrics.jsonl").write_text(text + json.dumps(stop) + "\n")
    assert load_run(tmp_path).partial == "stopped by SIGINT at step 3 of train.steps=10 (train.resume=auto continues it)"
    end = {"kind": "run", "step": 10, "tokens": 80, "width": 0, "seed": 0}
    (tmp_path / "metrics.jsonl").write_text(text + json.dumps(end) + "\n")
    assert load_run(tmp_path).partial is None


@pytest.mark.slow  # draws the figures (seconds)
def test_reports_on_partial_runs(tmp_path, caplog):
    from fastwidth.report.cli import make_report
    done = run(cfg_of(tmp_path, TINY_MLP, "train.steps=6", "stats.sharpness_iters=0", "stats.ntk_points=0",
                      "stats.bootstrap=0", out="done"))
    text = (done / "metrics.jsonl").read_text()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.yaml").write_text((done / "config.yaml").read_text())
    (cut / "metrics.jsonl").write_text(text[: int(len(text) * 0.7)])
    with caplog.at_level(logging.WARNING, logger="fastwidth.report"):
        md = make_report([cut], tmp_path / "rep", need_figure=True)
    note = re.search(r"partial run .*cut: (metrics.jsonl ends in a cut line \(\d+ bytes, left out\); "
                     r"unfinished: train rows up to step \d of train.steps=6)", caplog.text)
    assert note, caplog.text
    assert f"**Partial run** cut (mup): {note.group(1)}" in md.read_text()
    assert any(p.suffix == ".png" for p in (tmp_path / "rep").iterdir())
    from fastwidth.report.reader import load_run
    assert load_run(done).partial is None
    half = tmp_path / "half"
    half.mkdir()
    (half / "metrics.jsonl").write_text(text.splitlines()[0] + "\n" + text.splitlines()[1][:20])
    with pytest.raises(UserError, match=r"nothing to draw: .*half: metrics.jsonl ends in a cut line .*no config.yaml"):
        make_report([half], tmp_path / "rep-half", need_figure=True)
    assert not (tmp_path / "rep-half").exists()


# ------------------------------------------------------------------------------ 6. the nearest key, before torch

@pytest.mark.parametrize("typo, meant", [("optim.learning_rate", "optim.lr"), ("optim.wd", "optim.weight_decay"),
                                         ("train.checkpoint_every", "train.ckpt_every"),
                                         ("model.heads", "model.n_heads"), ("data.batchsize", "data.batch_size"),
                                         ("model.widht", "model.width")])
def test_the_nearest_key_is_the_one_meant(typo, meant):
    import dataclasses

    from fastwidth.config import Config
    section, key = typo.split(".")
    cls = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name != "name"}[section]
    assert _nearest(key, [f.name for f in dataclasses.fields(cls)], section + ".") == f" (did you mean '{meant}'?)"


def test_a_config_error_imports_no_torch(tmp_path):
    probe = ("import sys; from fastwidth.cli import main; rc = main(['train', '--config', 'demo', '--set', "
             "'optim.learning_rate=1']); print(rc, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.stdout.split() == ["2", "False"], res.stderr
    assert "did you mean 'optim.lr'?" in res.stderr


# ------------------------------------------------------------------------------ 7. the README's install

def test_readme_install_by_hand_is_the_makefiles():
    make = (ROOT / "Makefile").read_text()
    steps = re.findall(r"\$\(PY\) -m pip install -q --disable-pip-version-check (.+)", make)
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert len(steps) == 2
    for step in steps:
        assert f"`pip install {step.strip()}`" in readme, step


# ------------------------------------------------------------------------------ 8. kill -9 of a rank mid-checkpoint

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(sets, cfg, env_extra=None):
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "launch" / "train.py"), "--config", str(cfg), "--set", *sets]
    return subprocess.run(cmd, env={**env, **(env_extra or {})}, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
@pytest.mark.dist
def test_rank_killed_while_a_sharded_checkpoint_is_written(tmp_path):
    """Rank 1 is SIGKILLed in the middle of the step-6 save on 2 ranks (fsdp2: each rank writes its
    shards; under ddp rank 0 writes alone): step 3 stays the latest and
    loads; both ranks of the resume share the directory (rank 0's lock, the other not refused), the
    temporary directory is cleaned and the run finishes."""
    out = tmp_path / "run"
    sets = [*TINY_MLP, "stats.every=3", f"train.out_dir={out}", f"data.cache_dir={tmp_path / 'cache'}",
            "train.steps=9", "train.ckpt_every=3", "dist.backend=fsdp2"]
    res = torchrun(sets, empty_config(tmp_path), {"FASTWIDTH_TEST_KILL": "1:save6"})
    assert res.returncode != 0
    root = out / "checkpoints"
    latest = ckpt.latest_checkpoint(root)
    assert latest.name == "step_000003" and ckpt.read_checkpoint(latest)["step"] == 3
    assert (root / ".tmp-step_000006").is_dir(), sorted(p.name for p in root.iterdir())
    res = torchrun([*sets, "train.resume=true"], empty_config(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list(root.glob(".tmp-*")) and ckpt.latest_checkpoint(root).name == "step_000009"
    assert not (out / ".lock").exists()
