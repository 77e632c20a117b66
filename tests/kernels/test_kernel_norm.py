import pytest
import torch

from fastwidth.errors import UserError
from fastwidth.kernels import norm
from tests.kernels.helpers import compare, norm_fn, poisoned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_rms,residual,has_w,has_b", [
    (True, False, True, False), (True, True, True, False), (True, False, False, False),
    (False, False, True, True), (False, True, True, True), (False, False, False, False), (False, True, True, False),
])
def test_norm_matches_reference(dtype, is_rms, residual, has_w, has_b):
    N = 97
    x, r = torch.randn(3, 13, N) * 2 + 0.5, torch.randn(3, 13, N)
    w, b = torch.randn(N), torch.randn(N)
    inputs = [x, r if residual else None, w if has_w else None, b if has_b else None]
    up = [torch.randn(3, 13, N), torch.randn(3, 13, N) if residual else None]
    names = ["norm", "x"] + (["residual"] if residual else []) + (["weight"] if has_w else []) + (["bias"] if has_b else [])
    compare(lambda *a: norm_fn(is_rms, residual, "triton")(*a),
            lambda *a: norm_fn(is_rms, residual, None)(*a), inputs, up, dtype, names)


@pytest.mark.parametrize("is_rms", [True, False])
def test_per_row_rms_is_rms_of_norm_input(is_rms):
    x, r, w = torch.randn(37, 48), torch.randn(37, 48), torch.randn(48)
    with poisoned():
        y, s, rms = norm._norm(x, r, w, None, 1e-6, is_rms, "triton")
    expect = (x + r).double().pow(2).mean(-1).sqrt()
    assert rms.dtype == torch.float32 and rms.shape == (37,)
    torch.testing.assert_close(rms.double(), expect, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s, x + r)
    y2, rms2 = norm.rms_norm(x, w, return_rms=True, backend="triton")
    torch.testing.assert_close(rms2.double(), x.double().pow(2).mean(-1).sqrt(), rtol=1e-6, atol=1e-6)


def test_public_functions_agree_across_backends():
    x, r, w, b = torch.randn(5, 33), torch.randn(5, 33), torch.randn(33), torch.randn(33)
    for fn, args in [(norm.rms_norm, (x, w)), (norm.layer_norm, (x, w, b)),
                     (norm.rms_norm_residual, (x, r, w)), (norm.layer_norm_residual, (x, r, w, b))]:
        a, t = fn(*args, backend="triton"), fn(*args, backend="torch")
        for u, v in zip(a if isinstance(a, tuple) else (a,), t if isinstance(t, tuple) else (t,)):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_too_wide_is_a_user_error():
    with pytest.raises(UserError, match="32768"):
        norm.rms_norm(torch.zeros(1, 40000), torch.ones(40000), backend="triton")


@pytest.mark.parametrize("is_rms", [True, False])
def test_fp64_reference_is_computed_in_fp64(is_rms):
    # the error bounds of every norm test are measured against this reference: in fp32 it would
    # carry fp32's own error and the bound would collapse
    x, w, b = torch.randn(7, 300, dtype=torch.float64), torch.randn(300, dtype=torch.float64), \
        torch.randn(300, dtype=torch.float64)
    y, _, _ = norm.norm_ref(x, None, w, None if is_rms else b, 1e-5, is_rms)
    xc = x if is_rms else x - x.mean(-1, keepdim=True)
    exact = xc / (xc.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w + (0 if is_rms else b)
    assert y.dtype == torch.float64
    assert (y - exact).abs().max().item() < 1e-12


def test_block_plan_chunks_rows_wider_than_8k():
    assert [norm.block_plan(n) for n in (97, 4100, 8192, 8193, 32768)] == [
        (128, False), (8192, False), (8192, False), (8192, True), (8192, True)]
    assert [norm.block_plan(n, backward=True) for n in (97, 4096, 4100, 32768)] == [
        (128, False), (4096, False), (4096, True), (4096, True)]
    assert [norm.bwd_num_warps(n) for n in (1024, 2048, 4096)] == [4, 4, 16] and norm.num_warps(norm.CHUNK) == 8


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])  # bf16: second tier
@pytest.mark.parametrize("is_rms,residual,has_w,has_b", [
    (True, True, True, False), (True, False, False, False), (False, True, True, True), (False, False, True, False)])
def test_chunked_rows_match_reference(monkeypatch, dtype, is_rms, residual, has_w, has_b):
    # 64-column chunks stand in for 8k ones: 203 columns are three full chunks and a partial one;
    # the mean far from 0 is where a one-pass E[s^2] - mean^2 variance would cancel
    monkeypatch.setattr(norm, "CHUNK", 64)
    monkeypatch.setattr(norm, "BWD_CHUNK", 32)
    assert norm.block_plan(203) == (64, True) and norm.block_plan(203, backward=True) == (32, True)
    N = 203
    x, r = torch.randn(3, 5, N) * 2 + 30.0, torch.randn(3, 5, N)
    w, b = torch.randn(N), torch.randn(N)
    inputs = [x, r if residual else None, w if has_w else None, b if has_b else None]
    up = [torch.randn(3, 5, N), torch.randn(3, 5, N) if residual else None]
    names = ["norm", "x"] + (["residual"] if residual else []) + (["weight"] if has_w else []) + (["bias"] if has_b else [])
    compare(lambda *a: norm_fn(is_rms, residual, "triton")(*a),
            lambda *a: norm_fn(is_rms, residual, None)(*a), inputs, up, dtype, names)
    with poisoned():  # every row's statistics and outputs written
        y, s, rms = norm._norm(x, r if residual else None, w, b if has_b else None, 1e-5, is_rms, "triton")
    assert torch.isfinite(y).all() and torch.isfinite(rms).all()
    torch.testing.assert_close(rms.double(), (x + r if residual else x).double().pow(2).mean(-1).sqrt(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("is_rms", [True, False])
def test_rows_above_one_real_chunk(is_rms):
    # 16411 columns: two full 8192-column chunks and 27 more (four 4096-column ones backward)
    N = 16411
    x, w, b = torch.randn(3, N) + 1.0, torch.randn(N), torch.randn(N)
    compare(norm_fn(is_rms, False, "triton"), norm_fn(is_rms, False, None),
            [x, None, w, None if is_rms else b], [torch.randn(3, N), None], torch.float32,
            ["norm", "x", "weight"] + ([] if is_rms else ["bias"]))


@pytest.mark.parametrize("is_rms", [True, False])
def test_wide_row_backward(is_rms):
    # 4100 columns: one 8192-wide block forward, two 4096-column chunks backward
    N = 4100
    x, w, b = torch.randn(6, N), torch.randn(N), torch.randn(N)
    compare(norm_fn(is_rms, False, "triton"), norm_fn(is_rms, False, None),
            [x, None, w, None if is_rms else b], [torch.randn(6, N), None], torch.float32,
            ["norm", "x", "weight"] + ([] if is_rms else ["bias"]))
