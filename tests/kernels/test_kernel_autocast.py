"""Every Triton op under torch.autocast("cpu", dtype=torch.bfloat16), the GPU's default path
(train.precision auto = bf16 autocast, train.kernels auto = triton), run in the interpreter.

Inputs are fp32 leaves as a model's parameters and residual stream are; each op runs under
autocast with the Triton backend and with the torch reference, and both are held to the fp64
reference with autocast on (autocast leaves fp64 alone): the kernel's error at most 3x torch's
own bf16-autocast error plus a small atol, and every gradient in the dtype torch gives it.
"""

import pytest
import torch

from fastwidth.kernels import act, attention, norm, readout_ce, stats
from tests.kernels.helpers import compare


def autocast(fn):
    def f(*a):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(*a)
    return f


def bf16(t):
    """t as a bf16 GEMM under autocast would hand it on; the fp64 reference keeps fp64."""
    return t.to(torch.bfloat16) if t.dtype == torch.float32 else t


def _compare(fn_triton, fn_torch, inputs, upstream, names, atol=2e-3):
    compare(autocast(fn_triton), autocast(fn_torch), inputs, upstream, torch.float32, names, atol=atol, factor=3.0)


@pytest.mark.parametrize("has_bias", [False, True])
def test_readout_ce_under_autocast(monkeypatch, has_bias):
    monkeypatch.setattr(readout_ce, "CHUNK_ROWS", 16)  # several chunks: the fp32 accumulator crosses them
    V, N = 131, 33  # 131: not a multiple of 8, so the logits rows are padded
    h, w, b = torch.randn(3, 13, N), torch.randn(V, N) * 0.5, torch.randn(V)
    t = torch.randint(0, V, (3, 13))
    t[0, :3] = -100

    def fn(backend):
        def f(h, w, b):
            r = readout_ce.readout_ce_stats(h, w, t, multiplier=0.37, bias=b, z_loss=1e-3, label_smoothing=0.1,
                                            backend=backend)
            return r.loss, r.lse, r.true_logit
        return f
    _compare(fn("triton"), fn("torch"), [h, w, b if has_bias else None], [torch.tensor(1.3), None, None],
             ["readout_ce", "h", "weight"] + (["bias"] if has_bias else []))


def test_readout_ce_under_autocast_with_bf16_activations():
    # the model's case: h from a bf16 GEMM, the readout weight an fp32 parameter
    h, w = torch.randn(40, 24, dtype=torch.bfloat16, requires_grad=True), torch.randn(67, 24, requires_grad=True)
    t = torch.randint(0, 67, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = readout_ce.readout_cross_entropy(h, w, t, multiplier=0.5, backend="triton")
        ref = readout_ce.readout_cross_entropy(h, w, t, multiplier=0.5, backend="torch")
    g = torch.autograd.grad(got, (h, w))
    r = torch.autograd.grad(ref, (h, w))
    assert got.dtype == ref.dtype == torch.float32
    assert g[0].dtype == torch.bfloat16 and g[1].dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    for a, c in zip(g, r):
        torch.testing.assert_close(a.float(), c.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_under_autocast(causal):
    B, H, Hkv, T, D = 2, 4, 2, 37, 32
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)

    def fn(backend):
        return lambda q, k, v: attention.attention(q, k, v, scale=1.0 / D, causal=causal, backend=backend,
                                                   return_max_logit=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = attention.attention(q, k, v, scale=1.0 / D, backend="triton")
    assert o.dtype == torch.bfloat16  # as SDPA under autocast
    _compare(fn("triton"), fn("torch"), [q, k, v], [torch.randn(B, H, T, D), None], ["attention", "q", "k", "v"],
             atol=5e-3)


@pytest.mark.parametrize("is_rms", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_norm_under_autocast(is_rms, residual):
    M, N = 29, 97
    x, r, w, b = torch.randn(M, N) * 2, torch.randn(M, N), torch.randn(N), torch.randn(N)

    def fn(backend):
        def f(x, r, w, b):
            # x from a bf16 GEMM, the residual stream and the gains fp32: autocast's mixture
            xb = bf16(x)
            y, s, _ = norm._norm(xb, r, w, b, 1e-5, is_rms, backend) if backend else \
                norm.norm_ref(xb, r, w, b, 1e-5, is_rms)
            return (y, s) if residual else (y,)
        return f
    inputs = [x, r if residual else None, w, None if is_rms else b]
    names = ["norm", "x"] + (["residual"] if residual else []) + ["weight"] + ([] if is_rms else ["bias"])
    up = [torch.randn(M, N), torch.randn(M, N) if residual else None]
    _compare(fn("triton"), fn(None), inputs, up, names)


def test_activations_under_autocast():
    g, u, dy = torch.randn(7, 97) * 3, torch.randn(7, 97), torch.randn(7, 97)
    # the interpreter truncates each bf16 store (up to one ulp, 2^-7 of the value) where torch rounds:
    # one ulp at the largest gradient (|dup| = |dy silu(g)| < 30) on top of 3x torch's own error
    ulp = 2.0 ** -7 * float((dy * g * torch.sigmoid(g)).abs().max())
    _compare(lambda a: act.gelu(bf16(a), backend="triton"), lambda a: act.gelu_ref(bf16(a)), [g], [dy], ["gelu", "x"], atol=ulp)
    _compare(lambda a, b: act.swiglu(bf16(a), bf16(b), backend="triton"), lambda a, b: act.swiglu_ref(bf16(a), bf16(b)),
             [g, u], [dy], ["swiglu", "gate", "up"], atol=ulp)


def test_stats_under_autocast_stay_fp32():
    f = torch.randn(45, 97)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = stats.gram(f, backend="triton")
        ref = stats.gram(f, backend="torch")
        m = stats.moments_histogram(f, -3.0, 3.0, 17, backend="triton")
    exact = f.double() @ f.double().t()
    for g in (got, ref):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), exact, rtol=1e-5, atol=1e-4)  # fp32, not bf16, accuracy
    assert torch.equal(m.hist, stats.moments_histogram_ref(f, -3.0, 3.0, 17).hist)
