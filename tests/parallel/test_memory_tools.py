"""Memory tools in one process: micro-batching and activation checkpointing keep the trajectory,
memory rows are written, the planner refuses what does not fit, and a dry run on torch's fake
process group shards the flagship config over 8 and 64 ranks."""
import subprocess
import sys

import pytest

from fastwidth.cli import main
from fastwidth.config import load_config, resolve
from fastwidth.parallel.dryrun import dry_run, local_numels
from fastwidth.trainer.loop import run
from fastwidth.run.metrics import read_metrics

# An MLP on the synthetic teacher (no data preparation, so no tokenizer workers forked from this
# process); the GPT's blocks are checkpointed and micro-batched in the 2-rank tests (test_dist.py).
TINY_GPT = ["model.arch=mlp", "model.depth=3", "param.base_width=16", "data.source=synthetic", "data.in_dim=8",
            "data.num_classes=5", "data.batch_size=8", "data.probe_size=16", "sweep.widths=[16,32]",
            "train.progress=false", "train.log_every=1", "train.steps=6", "stats.every=3",
            "stats.sharpness_iters=0", "stats.ntk_points=0"]


def losses(run_dir):
    return {(r["width"], r["step"]): r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tools")
    return tmp, run(load_config(None, [*TINY_GPT, f"train.out_dir={tmp / 'plain'}", f"data.cache_dir={tmp / 'c'}"]))


@pytest.mark.parametrize("extra", [["data.micro_batch_size=2"], ["train.activation_checkpointing=block"],
                                   ["data.micro_batch_size=4", "train.activation_checkpointing=block"]])
def test_micro_batches_and_checkpointing_keep_the_trajectory(plain, extra):
    tmp, base = plain
    name = "-".join(e.split("=")[0].split(".")[1] + e.split("=")[1] for e in extra)
    other = run(load_config(None, [*TINY_GPT, f"train.out_dir={tmp / name}", f"data.cache_dir={tmp / 'c'}", *extra]))
    a, b = losses(base), losses(other)
    assert set(a) == set(b) and len(a) == 12
    err = max(abs(a[k] - b[k]) / abs(a[k]) for k in a)
    print(f"\n{extra}: max relative loss error over 6 steps x 2 widths = {err:.1e}")
    assert err < 1e-5
    ea = {(r["width"], r["step"]): r for r in read_metrics(base / "metrics.jsonl") if r["kind"] == "eval"}
    eb = {(r["width"], r["step"]): r for r in read_metrics(other / "metrics.jsonl") if r["kind"] == "eval"}
    assert sum(len(r.get("preact", {})) for r in ea.values()) >= 6
    for k in ea:  # preactivation moments see every row once (recomputed forwards are not counted)
        for layer, mom in ea[k].get("preact", {}).items():
            assert eb[k]["preact"][layer]["mean"] == pytest.approx(mom["mean"], rel=1e-4, abs=1e-6)
            assert eb[k]["preact"][layer]["var"] == pytest.approx(mom["var"], rel=1e-4)


def test_memory_rows_one_process(plain):
    _, base = plain
    rows = [r for r in read_metrics(base / "metrics.jsonl") if r["kind"] == "memory"]
    assert [(r["phase"], r["rank"]) for r in rows] == [("built", 0), ("ready", 0), ("step", 0)]
    for r in rows:
        assert {"host_peak_bytes", "device_peak_bytes", "model_bytes", "host_baseline_bytes"} <= set(r)
        assert r["host_peak_bytes"] >= r["host_baseline_bytes"] and r["model_bytes"] > 0


def train_cli(tmp_path, sets):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    return subprocess.run([sys.executable, "launch/train.py", "--config", str(cfg), "--set", *sets],
                          capture_output=True, text=True)


@pytest.mark.slow  # launches the CLI (3 s)
def test_bad_micro_batch_is_one_line(tmp_path):
    res = train_cli(tmp_path, [*TINY_GPT, f"train.out_dir={tmp_path / 'x'}", "data.micro_batch_size=3"])
    assert res.returncode == 2 and "data.micro_batch_size 3" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_train_refuses_what_the_planner_says_does_not_fit(tmp_path):
    big = ["model.arch=mlp", "model.depth=64", "model.width=65536", "data.source=synthetic", "data.in_dim=8",
           f"train.out_dir={tmp_path / 'big'}", "train.progress=false"]
    res = train_cli(tmp_path, big)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "dist.ignore_plan=true" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "big").exists()


def test_fake_process_group_dry_run_of_the_flagship():
    cfg = resolve(load_config("configs/dist/gpt_16k_8gpu.yaml", []))
    for world in (8, 64):
        local = local_numels(cfg, world, 0)
        # FSDP2 shards dim 0 of every tensor: the local embedding is 256/world rows of 16384
        assert local["shapes"]["embed.weight"] == (256 // world, 16384)
        assert local["total"] / world <= local["fsdp2"] <= local["total"] / world * 1.01
        rows = dry_run(cfg, world)
        mine = [r for r in rows if r["rank"] == 0 and r["choice"] == "zero3 +opt-offload"]
        assert mine and mine[0]["peak"] < cfg.dist.gpu_memory_gb * 1e9, mine
        print(f"\n{world} ranks: " + "; ".join(f"{r['choice']} rank {r['rank']} peak {r['peak'] / 2**30:.1f} GiB"
                                             for r in rows))


@pytest.mark.slow
def test_plan_command_dry_run(capsys):
    assert main(["plan", "--config", "configs/dist/gpt_16k_8gpu.yaml", "--dry-run", "--ranks", "8"]) == 0
    out = capsys.readouterr().out
    assert "dry run (fake process group" in out and "zero3 +opt-offload" in out


@pytest.mark.slow  # launches the CLI (3 s)
def test_slurm_tasks_without_a_launcher_are_refused(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("WORLD_SIZE", "RANK")}
    res = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/dist/sweep_ddp_cpu.yaml", "--set",
                          f"train.out_dir={tmp_path / 'x'}"], capture_output=True, text=True,
                         env={**env, "SLURM_NTASKS": "4"})
    assert res.returncode == 2 and "SLURM_NTASKS=4" in res.stderr and "torchrun" in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
