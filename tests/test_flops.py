"""Model FLOPs per token and MFU (fastwidth/trainer/flops.py): hand counts, an independent counter,
the peak table and the CPU peak cache, and the fields in the train rows and the report."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastwidth.config import load_config
from fastwidth.kernels import dispatch
from fastwidth.models import build_model
from fastwidth.report.summary import _compute_numbers
from fastwidth.trainer import flops, sweep
from fastwidth.trainer.loop import run
from fastwidth.run.metrics import read_metrics

from test_train import TINY_MLP, cfg_of

TOKENS = SimpleNamespace(kind="tokens", vocab_size=256, seq_len=64, in_shape=None, num_classes=None)


@pytest.mark.parametrize("width", [16, 256])
def test_demo_gpt_by_hand(width):
    # configs/demo.yaml: depth 2, MLP ratio 4, no biases, byte vocabulary 256, T = 64.
    # Matmul parameters a block: q, k, v, o (4 d^2) + fc, proj (8 d^2); readout d V.
    cfg = sweep.for_member(load_config("configs/demo.yaml"), width, None)
    assert (cfg.model.depth, cfg.model.mlp_ratio, cfg.model.bias, cfg.data.seq_len) == (2, 4, False, 64)
    L, d, V, T = 2, width, 256, 64
    n_matmul = L * 12 * d * d + d * V
    hand = 6 * n_matmul + 12 * L * T * d
    assert flops.flops_per_token(cfg, TOKENS) == hand
    assert {16: 86_016, 256: 10_223_616}[width] == hand  # the numbers the report shows


def _counted(cfg, io, x):
    # torch's own FLOP counter over one real forward of one example (convs and matmuls), times 3
    model, _ = build_model(cfg, io, device="cpu", seed=0)
    with dispatch.using("torch"), FlopCounterMode(display=False) as fc:
        model(x)
    return 3 * fc.get_total_flops()


def test_mlp_and_resnet_match_torch_flop_counter():
    mlp = load_config(None, ["model.arch=mlp", "model.depth=2", "model.width=24"])
    io = SimpleNamespace(kind="classes", vocab_size=None, seq_len=None, in_shape=(6,), num_classes=3)
    assert flops.flops_per_token(mlp, io) == 6 * (6 * 24 + 24 * 24 + 24 * 3) == _counted(mlp, io, torch.zeros(1, 6))
    res = load_config(None, ["model.arch=resnet", "model.depth=1", "model.width=4"])
    io = SimpleNamespace(kind="classes", vocab_size=None, seq_len=None, in_shape=(1, 28, 28), num_classes=10)
    got = flops.flops_per_token(res, io)
    assert got > 3 * 2 * 9 * 4 * 28 * 28  # at least the stem conv
    assert got == _counted(res, io, torch.zeros(1, 1, 28, 28))


def test_peak_table_and_override(monkeypatch):
    monkeypatch.delenv("FASTWIDTH_PEAK_FLOPS", raising=False)
    for name, peak in [("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert flops.device_peak(torch.device("cuda")) == peak
    monkeypatch.setenv("FASTWIDTH_PEAK_FLOPS", "1.5e12")
    assert flops.device_peak(torch.device("cuda")) == 1.5e12


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(flops, "_cache_file", lambda: tmp_path / "fastwidth" / "cpu_peak.json")
    first = flops.cpu_peak(n=128, reps=2)
    assert first > 1e8 and (tmp_path / "fastwidth" / "cpu_peak.json").is_file()
    monkeypatch.setattr(torch, "mm", lambda *a: pytest.fail("measured again"))
    assert flops.cpu_peak(n=128, reps=2) == first


def test_train_rows_carry_flops_and_mfu(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTWIDTH_PEAK_FLOPS", "1e10")
    run_dir = run(cfg_of(tmp_path, TINY_MLP, "train.steps=3", "train.tensorboard=true"))
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    fpt = {w: 6 * (6 * w + w * w + w * 3) for w in (16, 32)}  # in_dim 6, depth 2, 3 classes
    assert all(r["flops_per_token"] == fpt[r["width"]] for r in train)
    timed = [r for r in train if "tokens_per_s" in r]
    assert timed and all(r["mfu"] == pytest.approx(sum(fpt.values()) * r["tokens_per_s"] / 1e10) for r in timed)
    assert (run_dir / "tensorboard").is_dir()
    numbers = _compute_numbers(SimpleNamespace(rows=lambda kind: train))
    assert numbers["flops_per_token"] == fpt and numbers["mfu"] > 0
