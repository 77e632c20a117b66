import pytest
import torch

from fastwidth.kernels import stats
from tests.kernels.helpers import poisoned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 97), (5003,)])
def test_moments_histogram_match_reference(dtype, shape):
    x = (torch.randn(shape) * 2 + 0.3).to(dtype)
    with poisoned():
        got = stats.moments_histogram(x, -3.0, 3.0, 17, backend="triton")
    ref = stats.moments_histogram_ref(x, -3.0, 3.0, 17)
    xd = x.double().reshape(-1)
    assert got.count == x.numel()
    assert torch.equal(got.hist, ref.hist) and int(got.hist.sum()) == x.numel()
    assert got.hist[0] > 0 and got.hist[-1] > 0  # out-of-range values land in the edge bins
    for k, p in zip(("sum", "sumsq", "sum3", "sum4"), (1, 2, 3, 4)):
        exact = (xd ** p).sum()
        tol = 1e-5 * (xd.abs() ** p).sum() + 1e-6  # fp32 partials over ~1e3 elements a lane
        assert abs(float(getattr(got, k) - exact)) <= tol, k
    assert float(got.min) == float(xd.min()) and float(got.max) == float(xd.max())


def test_nan_is_left_out_of_histogram_and_range():
    x = torch.randn(101)
    x[7] = float("nan")
    for backend in ("triton", "torch"):
        m = stats.moments_histogram(x, -1.0, 1.0, 8, backend=backend)
        assert int(m.hist.sum()) == 100 and torch.isnan(m.sum)
        assert torch.isfinite(m.min) and torch.isfinite(m.max)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_acc", [False, True])
def test_gram_matches_reference(dtype, with_acc):
    f = torch.randn(45, 97).to(dtype)
    acc = torch.randn(45, 45) if with_acc else None
    with poisoned():
        got = stats.gram(f, acc, backend="triton")
    fd = f.double()
    ref = fd @ fd.t() + (0 if acc is None else acc.double())
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)


def test_bad_range_is_a_user_error():
    from fastwidth.errors import UserError
    with pytest.raises(UserError, match="hi > lo"):
        stats.moments_histogram(torch.zeros(3), 1.0, 1.0)
