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


def test_act_kernels_use_64_bit_offsets():
    # An FFN of 65,536 at 32k tokens is 2^31 elements: with int32 offsets program_id * BLOCK wraps and
    # the kernel reads and writes outside the tensor. Too big to run here, so check the compiled IR
    # (sm_90, no GPU needed): every pointer offset of every act kernel is 64-bit.
    from fastwidth.kernels import aot
    for spec in aot.SPECS["act"]():
        ttir = aot.compile_kernel(spec, 90).asm["ttir"]
        adds = [ln for ln in ttir.splitlines() if "tt.addptr" in ln]
        assert adds, spec.kernel
        for ln in adds:
            assert "xi64>" in ln.split(":")[-1] or ", i64" in ln, f"{spec.kernel}: 32-bit pointer offset: {ln.strip()}"


def test_act_kernels_cross_a_program_boundary_in_64_bits():
    # the interpreted kernels still agree with torch on a size that is not a multiple of the block
    x = torch.randn(act.BLOCK * 3 + 5)
    torch.testing.assert_close(act.gelu(x, backend="triton"), act.gelu_ref(x), rtol=1e-6, atol=1e-6)
