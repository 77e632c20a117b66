"""The compiled (not interpreted) kernels on a CUDA device, at shapes that use the GPU tiles.

Skipped without CUDA. bench/gpu_bench.py runs these first. Error bounds as on the CPU: twice
PyTorch's own error at the same precision against fp64, plus a small atol (looser for fp32
GEMMs, which torch may run in TF32 when a user enabled it).
"""

import pytest
import torch

from fastwidth.errors import UserError
from fastwidth.kernels import act, attention, norm, readout_ce, stats
from tests.kernels.helpers import compare

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DTYPES = [torch.float32, torch.bfloat16]


def cuda(*ts):
    return [t.cuda() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
def test_act_gpu(dtype):
    x, u, dy = cuda(torch.randn(1023, 1531) * 3, torch.randn(1023, 1531), torch.randn(1023, 1531))
    compare(lambda t: act.gelu(t, backend="triton"), act.gelu_ref, [x], [dy], dtype, ["gelu", "x"])
    compare(lambda a, b: act.swiglu(a, b, backend="triton"), act.swiglu_ref, [x, u], [dy], dtype,
            ["swiglu", "gate", "up"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_rms", [True, False])
def test_norm_gpu(dtype, is_rms):
    M, N = 4097, 3001
    x, r, w, b, dy, ds = cuda(torch.randn(M, N), torch.randn(M, N), torch.randn(N), torch.randn(N),
                              torch.randn(M, N), torch.randn(M, N))

    def f(backend):
        def g(x, r, w, b=None):  # RMSNorm has no bias: it is not an input (autograd.grad would raise)
            y, s, _ = norm._norm(x, r, w, b, 1e-5, is_rms, backend) if backend else norm.norm_ref(x, r, w, b, 1e-5, is_rms)
            return y, s
        return g
    inputs = [x, r, w] + ([] if is_rms else [b])
    compare(f("triton"), f(None), inputs, [dy, ds], dtype, ["norm", "x", "residual", "weight"] + ([] if is_rms else ["bias"]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_readout_ce_gpu(dtype):
    M, N, V = 4099, 768, 50257
    h, w, bias = cuda(torch.randn(M, N), torch.randn(V, N) * 0.05, torch.randn(V))
    t = torch.randint(0, V, (M,), device="cuda")
    t[:7] = -100

    def f(backend):
        def g(h, w, b):
            r = readout_ce.readout_ce_stats(h, w, t, multiplier=0.5, bias=b, z_loss=1e-4, label_smoothing=0.05,
                                            backend=backend)
            return r.loss, r.lse, r.true_logit
        return g
    compare(f("triton"), f("torch"), [h, w, bias], [torch.tensor(1.0, device="cuda"), None, None], dtype,
            ["readout_ce", "h", "weight", "bias"], atol=2e-3)


# fp32 on a GPU runs SDPA by default; the Triton kernels have no fp32 GPU tiles, so asking for
# them is refused with one line
def test_attention_gpu_fp32_goes_to_sdpa_or_is_refused():
    q = torch.randn(1, 4, 300, 64, device="cuda")
    torch.testing.assert_close(attention.attention(q, q, q, scale=1.0 / 64),
                               attention.attention(q, q, q, scale=1.0 / 64, backend="torch"))
    with pytest.raises(UserError, match="bf16 or fp16"):
        attention.attention(q, q, q, scale=1.0 / 64, backend="triton")


def test_attention_gpu_bf16_autocast_default_path():
    # train.kernels=auto, precision=auto on CUDA: fp32 activations under bf16 autocast reach the Triton kernel
    q = torch.randn(2, 8, 1024, 128, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        o = attention.attention(q, q, q, scale=1.0 / 128, causal=True)
        r = attention.attention(q, q, q, scale=1.0 / 128, causal=True, backend="torch")
    assert o.dtype == torch.bfloat16
    torch.testing.assert_close(o.float(), r.float(), rtol=2e-2, atol=2e-2)


# bf16 at every head-dim class; fp16 (its own autotuning and compilation) at one shape, to keep the
# bench's test part inside its budget
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype,H,Hkv,D,T", [(torch.bfloat16, 8, 2, 128, 1031), (torch.bfloat16, 4, 4, 64, 517),
                                             (torch.bfloat16, 4, 4, 32, 300), (torch.bfloat16, 6, 3, 96, 257),
                                             (torch.float16, 4, 4, 64, 517)])
def test_attention_gpu(dtype, causal, H, Hkv, D, T):
    q, k, v, do = cuda(torch.randn(2, H, T, D), torch.randn(2, Hkv, T, D), torch.randn(2, Hkv, T, D),
                       torch.randn(2, H, T, D))

    def f(backend):
        return lambda q, k, v: attention.attention(q, k, v, scale=1.0 / D, causal=causal, backend=backend,
                                                   return_max_logit=True)
    compare(f("triton"), f("math"), [q, k, v], [do, None], dtype, ["attention", "q", "k", "v"], atol=2e-3)


def test_readout_ce_gpu_bf16_autocast():
    # the GPT's case on CUDA: fp32 features and readout weight under bf16 autocast (the crash of issue 9)
    M, N, V = 2048, 512, 50257
    h = torch.randn(M, N, device="cuda", requires_grad=True)
    w = (torch.randn(V, N, device="cuda") * 0.05).requires_grad_(True)
    t = torch.randint(0, V, (M,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = readout_ce.readout_cross_entropy(h, w, t, multiplier=0.5, backend="triton")
        ref = readout_ce.readout_cross_entropy(h, w, t, multiplier=0.5, backend="torch")
    g, r = torch.autograd.grad(got, (h, w)), torch.autograd.grad(ref, (h, w))
    assert g[1].dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)


def test_stats_gpu():
    x = torch.randn(10_000_019, device="cuda")
    got = stats.moments_histogram(x, -4.0, 4.0, 100, backend="triton")
    ref = stats.moments_histogram_ref(x, -4.0, 4.0, 100)
    assert torch.equal(got.hist, ref.hist)
    torch.testing.assert_close(torch.stack(got[1:7]), torch.stack(ref[1:7]), rtol=1e-5, atol=1e-2)
    f = torch.randn(1000, 4099, device="cuda")
    torch.testing.assert_close(stats.gram(f, backend="triton").double(), f.double() @ f.double().t(), rtol=1e-4,
                               atol=1e-2)
