import pytest
import torch

from fastwidth.errors import UserError
from fastwidth.kernels import norm
from tests.kernels.helpers import compare, poisoned


def _fn(is_rms, residual, has_w, has_b, backend):
    def f(x, r, w, b):
        y, s, rms = norm._norm(x, r, w, b, 1e-5, is_rms, backend) if backend else \
            norm.norm_ref(x, r, w, b, 1e-5, is_rms)
        return (y, s) if residual else (y,)
    return f


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
    compare(lambda *a: _fn(is_rms, residual, has_w, has_b, "triton")(*a),
            lambda *a: _fn(is_rms, residual, has_w, has_b, None)(*a), inputs, up, dtype, names)


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
