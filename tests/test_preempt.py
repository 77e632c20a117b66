"""Preemption (SIGTERM / SIGUSR1), periodic checkpoints, resume=auto, kill -9 during a checkpoint."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fastwidth.run import checkpoint as ckpt
from fastwidth.trainer import loop
from fastwidth.trainer.loop import run
from fastwidth.run.metrics import read_metrics
from fastwidth.trainer.preempt import CheckpointClock, Preempted

from test_train import ROOT, TINY_GPT, TINY_MLP, cfg_of, train_losses


PROCESS_MEASURES = {"wall_s", "tokens_per_s", "peak_mem_bytes", "mfu"}  # of the process, not of the training


def rows_without_wall_time(run_dir):
    return [{k: v for k, v in r.items() if k not in PROCESS_MEASURES}
            for r in read_metrics(Path(run_dir) / "metrics.jsonl")
            if r["kind"] not in ("preempted", "data", "run", "memory")]  # those record each process, not the training


def final_weights(run_dir):
    meta = ckpt.read_checkpoint(ckpt.latest_checkpoint(Path(run_dir) / "checkpoints"))
    return {f: t for f, t in meta["tensors"].items()}


def assert_bit_equal(a_dir, b_dir):
    a, b = final_weights(a_dir), final_weights(b_dir)
    assert a.keys() == b.keys()
    for f in a:
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), (f, k)
    assert rows_without_wall_time(a_dir) == rows_without_wall_time(b_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGUSR1"])  # SIGUSR1 takes the same path: the second tier
def test_signal_finishes_the_step_checkpoints_and_resumes_bit_equal(tmp_path, monkeypatch, sig):
    # one model at a time (sweep.stack=false): the signal is sent from inside Trainer.train_step
    straight = run(cfg_of(tmp_path, TINY_GPT, "train.steps=12", "sweep.stack=false", out="straight"))
    step_of = loop.Trainer.train_step

    def train_step_then_signal(self, m, x, y):  # the signal arrives in the middle of step 7
        if m.step == 6 and m is self.members[0]:
            os.kill(os.getpid(), sig)
        return step_of(self, m, x, y)

    monkeypatch.setattr(loop.Trainer, "train_step", train_step_then_signal)
    with pytest.raises(Preempted) as info:
        run(cfg_of(tmp_path, TINY_GPT, "train.steps=12", "sweep.stack=false", out="stopped"))
    monkeypatch.setattr(loop.Trainer, "train_step", step_of)
    stopped = tmp_path / "stopped"
    assert info.value.step == 7 and info.value.signal_name == sig.name and info.value.exit_code == 143
    assert (stopped / "checkpoints" / "latest").read_text().strip() == "step_000007"
    meta = ckpt.read_checkpoint(stopped / "checkpoints" / "step_000007")
    assert all(e["step"] == 7 for e in meta["members"])  # every model finished step 7
    assert signal.getsignal(sig) is signal.SIG_DFL  # handlers are restored after the run
    resumed = run(cfg_of(tmp_path, TINY_GPT, "train.steps=12", "sweep.stack=false", "train.resume=auto", out="stopped"))
    assert_bit_equal(straight, resumed)


@pytest.mark.slow  # a whole training run (several s): the second tier keeps the fast one under 5 minutes
def test_sigterm_from_outside_exits_143_and_resumes_bit_equal(tmp_path):
    """The real thing: a training process gets SIGTERM from another process at whatever step it
    is at, exits 143 with a checkpoint; resuming to a few steps later equals a straight run."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"arch": "mlp"}}))
    sets = [*TINY_MLP, f"train.out_dir={tmp_path / 'stopped'}", f"data.cache_dir={tmp_path / 'cache'}",
            "train.steps=100000", "stats.every=7"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(cfg_file),
                             "--set", *sets], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM received: stopped after step" in err and "Traceback" not in err
    stopped_at = int((tmp_path / "stopped" / "checkpoints" / "latest").read_text().strip()[len("step_"):])
    assert 1 <= stopped_at < 100000
    print(f"SIGTERM from outside: exit 143, checkpoint at step {stopped_at}; resumed to {stopped_at + 3}")
    later = f"train.steps={stopped_at + 3}"
    resumed = run(cfg_of(tmp_path, TINY_MLP, later, "stats.every=7", "train.resume=auto", out="stopped"))
    straight = run(cfg_of(tmp_path, TINY_MLP, later, "stats.every=7", out="straight"))
    assert train_losses(resumed) == train_losses(straight)
    assert_bit_equal(straight, resumed)


KILL_DURING_SECOND_CHECKPOINT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from fastwidth.config import load_config
from fastwidth.run import checkpoint
from fastwidth.trainer.loop import run
real_save, calls = checkpoint.save_file, []
def save_then_die(tensors, path, *a, **k):
    calls.append(path)
    real_save(tensors, path, *a, **k)
    if len(calls) == 6:  # 4 files a checkpoint (2 models x model + optim): mid-way through the second
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_file = save_then_die
run(load_config(None, {sets!r}))
"""


@pytest.mark.slow  # a whole training run (several s): the second tier keeps the fast one under 5 minutes
def test_kill_9_during_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    sets = [*TINY_MLP, f"train.out_dir={tmp_path / 'killed'}", f"data.cache_dir={tmp_path / 'cache'}",
            "train.steps=9", "train.ckpt_every=3"]
    script = KILL_DURING_SECOND_CHECKPOINT.format(root=str(ROOT), sets=sets)
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    root = tmp_path / "killed" / "checkpoints"
    assert any(p.name.startswith(".tmp-step_000006") for p in root.iterdir())  # the write in flight
    assert (root / "latest").read_text().strip() == "step_000003"
    meta = ckpt.read_checkpoint(ckpt.latest_checkpoint(root))  # loads: checksums match
    assert meta["step"] == 3
    resumed = run(cfg_of(tmp_path, TINY_MLP, "train.steps=9", "train.ckpt_every=3", "train.resume=auto",
                         out="killed"))
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # the next save cleared it
    straight = run(cfg_of(tmp_path, TINY_MLP, "train.steps=9", "train.ckpt_every=3", out="straight"))
    assert_bit_equal(straight, resumed)


def test_periodic_checkpoints_are_bounded_and_latest_names_the_newest(tmp_path):
    run_dir = run(cfg_of(tmp_path, TINY_MLP, "train.steps=6", "train.ckpt_minutes=1e-9", "train.keep_checkpoints=2"))
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000005", "step_000006"]
    assert (root / "latest").read_text().strip() == "step_000006"


def test_checkpoint_clock():
    now = [0.0]
    clock = CheckpointClock(2.0, clock=lambda: now[0])
    now[0] = 119.0
    assert not clock.due()
    now[0] = 120.0
    assert clock.due()
    clock.reset()
    assert not clock.due()
    assert not CheckpointClock(0.0).due()


def test_resume_auto_starts_fresh_without_a_checkpoint_and_resumes_with_one(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "tokens": 8, "width": 16, "seed": 0, '
                                           '"loss": 9.0}\n')  # a job killed before its first checkpoint
    fresh = run(cfg_of(tmp_path, TINY_MLP, "train.steps=4", "train.resume=auto"))
    assert train_losses(fresh) == train_losses(run(cfg_of(tmp_path, TINY_MLP, "train.steps=4", out="ref")))
    more = run(cfg_of(tmp_path, TINY_MLP, "train.steps=6", "train.resume=auto"))
    assert [r["step"] for r in read_metrics(more / "metrics.jsonl") if r["kind"] == "train" and r["width"] == 16
            and r["seed"] == 0] == [1, 2, 3, 4, 5, 6]


def test_replacing_a_checkpoint_of_the_same_name_survives_a_kill_between_renames(tmp_path, monkeypatch):
    """The final save at a periodic checkpoint's step (and every save of a sequential sweep, named
    by its slowest member) rewrites one name: the old one is set aside, never deleted first."""
    from types import SimpleNamespace
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    member = SimpleNamespace(name="w3_s0", width=3, seed=0, step=5, model=lin, optimizer=opt)
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 5, [member], {"marker": "old"})
    real = os.replace

    def die_on_publish(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt("killed between the renames")   # the new one never lands
        return real(src, dst)
    monkeypatch.setattr(ckpt.os, "replace", die_on_publish)
    with torch.no_grad():
        lin.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 5, [member], {"marker": "new"})
    monkeypatch.setattr(ckpt.os, "replace", real)
    assert not (root / "step_000005").exists()                        # the kill's state: only the set-aside copy
    meta = ckpt.read_checkpoint(ckpt.latest_checkpoint(root))         # recovered, whole, the old one
    assert meta["marker"] == "old" and not list(root.glob(ckpt.ASIDE + "*"))
    ckpt.save_checkpoint(root, 5, [member], {"marker": "new"})         # and a normal replacement
    assert ckpt.read_checkpoint(ckpt.latest_checkpoint(root))["marker"] == "new"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000005"]
