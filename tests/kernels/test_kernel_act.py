import pytest
import torch

from fastwidth.kernels import act
from tests.kernels.helpers import compare


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_matches_reference(dtype):
    x = torch.randn(37, 97) * 3
    x[0, :4] = torch.tensor([0.0, 30.0, -30.0, 1e-4])  # saturated tails and the cancellation zone
    dy = torch.randn(37, 97)
    compare(lambda t: act.gelu(t, backend="triton"), act.gelu_ref, [x], [dy], dtype, ["gelu", "x"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_reference(dtype):
    g, u = torch.randn(3, 11, 97) * 3, torch.randn(3, 11, 97)
    dy = torch.randn(3, 11, 97)
    compare(lambda a, b: act.swiglu(a, b, backend="triton"), act.swiglu_ref, [g, u], [dy], dtype,
            ["swiglu", "gate", "up"])


def test_gelu_is_the_tanh_approximation():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    exact = torch.nn.functional.gelu(x)
    assert torch.allclose(act.gelu(x, backend="torch"), torch.nn.functional.gelu(x, approximate="tanh"))
    assert not torch.allclose(act.gelu(x, backend="torch"), exact, atol=1e-6)


def test_swiglu_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="gate"):
        act.swiglu(torch.zeros(3, 4), torch.zeros(3, 5))
