"""pytest-benchmark suite of the CPU benchmarks: `make bench` (pytest bench/ -s; --benchmark-only leaves out the ratio tests).

Each benchmark shares a group with the baseline it is judged against, so the table of one run
shows them side by side and `--benchmark-compare` shows a regression as a ratio against a run
saved with `--benchmark-autosave`. Sizes are small (a loaded 2-core machine runs the suite in
about a minute); the scripts bench/bench_*.py measure the full demo sizes and append CSV rows.
The GPU benchmark keeps its own time-boxed script (bench/gpu_bench.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# A demo-shaped sweep small enough for rounds of a few seconds: µP GPT, widths 32 and 64, 2 seeds.
SWEEP = ["model.arch=gpt", "model.depth=2", "model.head_dim=16", "param.base_width=32", "data.source=stdlib",
         "data.seq_len=64", "data.batch_size=16", "data.probe_size=16", "sweep.widths=[32,64]",
         "sweep.seeds=[0,1]", "train.steps=1000", "train.progress=false", "stats.every=4",
         "stats.sharpness_iters=0", "stats.ntk_points=0", "stats.kernel_points=32",
         "train.out_dir=/tmp/fastwidth-bench-unused"]


def pytest_collection_modifyitems(items):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def sweep():
    """(cfg, stream, device) of the benchmark sweep; members are built per benchmark."""
    from fastwidth.config import load_config, resolve
    from fastwidth.data import build_stream
    cfg = resolve(load_config(None, SWEEP))
    return cfg, build_stream(cfg.data), torch.device("cpu")


def fresh_members(sweep_fixture):
    from fastwidth.trainer.loop import make_members
    cfg, stream, device = sweep_fixture
    return make_members(cfg, stream, device)


def train_step(m, x, y, cfg, hooks=None) -> None:
    """One optimizer step of one member, as the loop takes it (bench_stats.py's step)."""
    from bench_stats import step
    step(m, x, y, cfg, hooks)


def tokens_of(cfg, steps: int, models: int) -> int:
    return steps * cfg.data.batch_size * cfg.data.seq_len * models
