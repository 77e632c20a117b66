import pytest
import torch

from fastwidth.errors import UserError
from fastwidth.kernels import act, attention, dispatch, native, norm, readout_ce, stats


def test_set_backend_validates_and_resolves():
    try:
        with pytest.raises(UserError, match="'cuda' is not one of auto, torch, triton"):
            dispatch.set_backend("cuda")
        x = torch.zeros(2)
        dispatch.set_backend("auto")
        cpu = "native" if native.available() else "torch"  # auto on a CPU tensor
        assert dispatch.get_backend() == "auto" and dispatch.resolve(None, x) == cpu
        dispatch.set_backend("triton")
        assert dispatch.resolve(None, x) == "triton" and dispatch.resolve("torch", x) == "torch"
        assert dispatch.resolve("math", x, extra=("math",)) == "math"
        with pytest.raises(UserError, match="not one of"):
            dispatch.resolve("math", x)
    finally:
        dispatch.set_backend("auto")


def test_default_backend_reaches_the_ops(monkeypatch):
    called = []
    real = act._gelu_fwd_op
    monkeypatch.setattr(act, "_gelu_fwd_op", lambda x: called.append(1) or real(x))
    try:
        dispatch.set_backend("triton")
        act.gelu(torch.randn(5))
        dispatch.set_backend("torch")
        act.gelu(torch.randn(5))
    finally:
        dispatch.set_backend("auto")
    assert called == [1]


@pytest.mark.slow  # torch.compile (4 s)
def test_ops_trace_under_torch_compile():
    # register_fake must describe every output: aot_eager traces each op with fake tensors,
    # then runs the real (interpreted) kernels; fullgraph=True fails on any graph break.
    x, w, b = torch.randn(3, 5, 48, requires_grad=True), torch.randn(48, requires_grad=True), torch.randn(48)
    q = torch.randn(1, 2, 9, 32, requires_grad=True)
    W = torch.randn(37, 48, requires_grad=True)
    t = torch.randint(0, 37, (3, 5))

    def f(x, w, q, W):
        y = norm.layer_norm(act.gelu(x, backend="triton"), w, b, backend="triton")
        y, s, rms = norm.rms_norm_residual(y, x, w, backend="triton")
        o = attention.attention(q, q, q, scale=0.1, backend="triton")
        loss = readout_ce.readout_cross_entropy(act.swiglu(s, y, backend="triton"), W, t, multiplier=0.5,
                                                backend="triton")
        return loss + o.sum() + rms.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(x, w, q, W)
    ref = f(x, w, q, W)
    torch.testing.assert_close(got, ref)
    g1 = torch.autograd.grad(got, (x, w, q, W))
    g2 = torch.autograd.grad(ref, (x, w, q, W))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)
    m = torch.compile(lambda z: stats.moments_histogram(z, -1.0, 1.0, 8, backend="triton").hist,
                      backend="aot_eager", fullgraph=True)(torch.randn(100))
    assert int(m.sum()) == 100
