"""pytest-benchmark timings of the native CPU ops, each beside its torch baseline.

    pytest bench/test_bench_native.py --benchmark-only

Each op is one test parametrized by backend in a group of its own, so the native and torch rows sit
side by side in the table (the ratio column is against the group's fastest); bench/bench_native.py
measures the same ratios alternating in one run.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastwidth.kernels import norm, readout_ce, rope, stats  # noqa: E402
from fastwidth.nn.attention import rope_tables  # noqa: E402
from tests.kernels.native_skip import native_or_skip  # noqa: E402

native_or_skip()
BACKENDS = ["native", "torch"]


def _grad_of(fn, inputs):
    def run():
        out = fn()
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(sum(o.sum() for o in out if o.requires_grad), inputs)
    return run


@pytest.mark.benchmark(group="native: moments + histogram")
@pytest.mark.parametrize("backend", BACKENDS)
def test_moments_histogram(benchmark, backend):
    x = torch.randn(1024, 2048)
    benchmark(lambda: stats.moments_histogram(x, -8.0, 8.0, 64, backend=backend))


@pytest.mark.benchmark(group="native: readout + cross-entropy (fwd+bwd)")
@pytest.mark.parametrize("backend", ["native", "eager"])
def test_readout_cross_entropy_vocab_50257(benchmark, backend):
    h, w = torch.randn(256, 128, requires_grad=True), (torch.randn(50257, 128) * 0.1).requires_grad_()
    t = torch.randint(0, 50257, (256,))
    if backend == "native":
        fn = lambda: readout_ce.readout_cross_entropy(h, w, t, backend="native")  # noqa: E731
    else:
        fn = lambda: F.cross_entropy(F.linear(h, w), t)  # noqa: E731
    benchmark(_grad_of(fn, (h, w)))


@pytest.mark.benchmark(group="native: RMSNorm + residual (fwd+bwd)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_residual(benchmark, backend):
    x, r = torch.randn(1024, 512, requires_grad=True), torch.randn(1024, 512, requires_grad=True)
    w = torch.ones(512, requires_grad=True)
    benchmark(_grad_of(lambda: norm.rms_norm_residual(x, r, w, backend=backend)[:2], (x, r, w)))


@pytest.mark.benchmark(group="native: RoPE (fwd+bwd)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_rope(benchmark, backend):
    q = torch.randn(16, 64, 32, 16).transpose(1, 2).requires_grad_()
    cos, sin = rope_tables(64, 16, 10000.0)
    benchmark(_grad_of(lambda: rope.rope(q, cos, sin, backend=backend), (q,)))
