"""The native ops' build, load, dispatch and CLI, and the one-pass moments/histogram op against
its torch reference (fastwidth/kernels/stats.py)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastwidth import cli
from fastwidth.errors import UserError
from fastwidth.kernels import dispatch, native, norm, readout_ce, rope, stats
from fastwidth.stats.moments import histogram_ref
from tests.kernels.native_skip import native_or_skip

native_or_skip()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 97), (5003,), (3, 70001)])  # the last crosses 32768-element chunks
def test_moments_histogram_matches_reference(dtype, shape):
    x = (torch.randn(shape) * 2 + 0.3).to(dtype)
    got = stats.moments_histogram(x, -3.0, 3.0, 17, backend="native")
    ref = stats.moments_histogram_ref(x, -3.0, 3.0, 17)  # fp64 sums of the same fp32 values
    assert got.count == x.numel() and int(got.hist.sum()) == x.numel()
    assert bool((got.hist[[0, -1]] > 0).all())  # the edge bins hold the values outside [lo, hi)
    assert np.array_equal(got.hist.numpy(), histogram_ref(x, 17, -3.0, 3.0))  # fp64 bins, as numpy
    absx = x.double().abs().reshape(-1)
    for p, name in enumerate(("sum", "sumsq", "sum3", "sum4"), start=1):
        g, r = getattr(got, name), getattr(ref, name)
        # fp64 partials: a few fp64 ulps of the sum of |x|^p, where fp32 lanes would be ~1e-7
        assert g.dtype == torch.float64 and abs(float(g - r)) <= 1e-13 * float((absx ** p).sum()), name
    assert float(got.min) == float(ref.min) and float(got.max) == float(ref.max)


def test_moments_of_a_strided_view_and_edges():
    x = torch.randn(40, 61).t()  # not contiguous
    x[3, 5] = float("inf")
    x[4, 6] = -float("inf")
    x[5, 7] = 3.0  # exactly hi: the last bin
    got = stats.moments_histogram(x, -3.0, 3.0, 12, backend="native")
    assert np.array_equal(got.hist.numpy(), histogram_ref(x, 12, -3.0, 3.0))
    assert float(got.max) == float("inf") and float(got.min) == -float("inf")


def test_shifted_sums_and_bins_far_from_zero():
    # mean/std = 1e4: raw sums would cancel every digit of the 4th central moment; the bins are
    # 1e-4 wide at 100, where fp32 (x - lo) would misplace values near an edge
    x = 100.0 + 0.01 * torch.randn(20011) ** 3
    got = stats.moments_histogram(x, 99.95, 100.05, 37, backend="native", shift=float(x[0]))
    ref = stats.moments_histogram_ref(x, 99.95, 100.05, 37, shift=float(x[0]))
    for name in ("sum", "sumsq", "sum3", "sum4"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-12, atol=1e-12)
    assert np.array_equal(got.hist.numpy(), histogram_ref(x, 37, 99.95, 100.05))
    # every 7th element, counted from the first across the 32768-element chunks
    strided = stats.moments_histogram(x.repeat(4), 99.95, 100.05, 37, backend="native", hist_stride=7)
    assert np.array_equal(strided.hist.numpy(), histogram_ref(x.repeat(4)[::7], 37, 99.95, 100.05))
    assert strided.count == 4 * x.numel()


def test_nan_is_left_out_of_histogram_and_range():
    x = torch.randn(101)
    x[7] = float("nan")
    m = stats.moments_histogram(x, -1.0, 1.0, 8, backend="native")
    assert int(m.hist.sum()) == 100 and torch.isnan(m.sum) and torch.isnan(m.sum4)
    assert torch.isfinite(m.min) and torch.isfinite(m.max)
    allnan = stats.moments_histogram(torch.full((9,), float("nan")), -1.0, 1.0, 4, backend="native")
    assert int(allnan.hist.sum()) == 0 and torch.isnan(allnan.min) and torch.isnan(allnan.max)


def test_auto_picks_native_on_cpu_and_set_backend_accepts_it():
    x = torch.zeros(3)
    try:
        dispatch.set_backend("auto")
        assert dispatch.resolve(None, x) == "native"
        dispatch.set_backend("native")
        assert dispatch.resolve(None, x) == "native" and dispatch.resolve("torch", x) == "torch"
    finally:
        dispatch.set_backend("auto")


def test_cache_dir_follows_xdg_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTWIDTH_NATIVE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.cache_dir() == tmp_path / "fastwidth" / "native"
    monkeypatch.setenv("FASTWIDTH_NATIVE_CACHE", str(tmp_path / "x"))
    assert native.cache_dir() == tmp_path / "x"
    key = native.build_key()
    assert key.startswith(f"torch{torch.__version__.split('+')[0]}-") and len(key.split("-")[-1]) == 16


def _fresh_loader(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_ops", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setenv("FASTWIDTH_NATIVE_CACHE", str(tmp_path / "cache"))


def test_missing_compiler_is_one_clear_line(monkeypatch, tmp_path):
    _fresh_loader(monkeypatch, tmp_path)
    monkeypatch.setenv("CXX", "no-such-c++")
    with pytest.raises(UserError, match="no C\\+\\+ compiler .*no-such-c\\+\\+") as e:
        native.load()
    assert "\n" not in str(e.value)
    assert not native.available()  # remembered: auto falls back to torch without retrying


def test_missing_sources_are_one_clear_line(monkeypatch, tmp_path):
    """A wheel without csrc/: the loader says so before reading any source (build_key hashes them)."""
    _fresh_loader(monkeypatch, tmp_path)
    monkeypatch.setattr(native, "CSRC", tmp_path / "no-csrc")
    with pytest.raises(UserError, match="C\\+\\+ sources not found at .*no-csrc") as e:
        native.load()
    assert "\n" not in str(e.value) and not native.available()
    assert not (tmp_path / "cache").exists()


def test_failed_build_is_one_line_naming_the_error(monkeypatch, tmp_path):
    _fresh_loader(monkeypatch, tmp_path)
    fake = tmp_path / "fakecxx"
    # answers torch's version probes as the real compiler, fails every compile
    fake.write_text('#!/bin/sh\ncase " $* " in *" -c "*) echo "unity.cpp:1:2: error: boom" >&2; exit 1;; esac\n'
                    'exec c++ "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(UserError, match="failed to build .*error: boom.*build.log") as e:
        native.load()
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache").rglob("built.ok"))


def test_build_ext_command(capsys):
    assert cli.main(["build-ext"]) == 0
    out = capsys.readouterr().out
    assert "native ops" in out and "moments_histogram" in out and "rope" in out


def test_a_new_process_loads_from_cache_without_building():
    code = ("import logging; logging.basicConfig(level=logging.INFO); from fastwidth.kernels import native; "
            "print(native.load().rope)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "fastwidth_native.rope" in run.stdout and "building native ops" not in run.stderr
    assert (native.cache_dir() / native.build_key() / "built.ok").is_file()


def test_native_ops_trace_under_torch_compile():
    # The fakes registered in native.py describe every output: fullgraph=True fails on a break.
    x, w, b = torch.randn(3, 5, 48, requires_grad=True), torch.randn(48, requires_grad=True), torch.randn(48)
    q = torch.randn(1, 2, 9, 32, requires_grad=True)
    cos, sin = torch.randn(9, 16), torch.randn(9, 16)
    W = torch.randn(37, 48, requires_grad=True)
    t = torch.randint(0, 37, (3, 5))

    def f(x, w, q, W):
        y = norm.layer_norm(x, w, b, backend="native")
        y, s, rms = norm.rms_norm_residual(y, x, w, backend="native")
        o = rope.rope(q, cos, sin, backend="native")
        loss = readout_ce.readout_cross_entropy(s * y, W, t, multiplier=0.5, backend="native")
        return loss + (o * o).sum() + rms.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, ref = compiled(x, w, q, W), f(x, w, q, W)
    torch.testing.assert_close(got, ref)
    for a, c in zip(torch.autograd.grad(got, (x, w, q, W)), torch.autograd.grad(ref, (x, w, q, W))):
        torch.testing.assert_close(a, c)
    hist = torch.compile(lambda z: stats.moments_histogram(z, -1.0, 1.0, 8, backend="native").hist,
                         backend="aot_eager", fullgraph=True)(torch.randn(100))
    assert int(hist.sum()) == 100
