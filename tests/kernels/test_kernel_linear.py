"""The fused µP linear (fastwidth/kernels/linear.py), interpreted, against the eager layer.

act(alpha · x Wᵀ + b) for every activation, with and without bias, alpha != 1: outputs and the
gradients of x, W, b (swiglu: both halves' weights and biases), in fp32 and under bf16
autocast, each bounded by twice torch's own error against the fp64 reference (helpers.compare).
The interpreter's bf16 stores truncate; the kernel rounds to nearest itself, so 2x holds there.
"""

import pytest
import torch

from fastwidth.errors import UserError
from fastwidth.kernels import dispatch, linear as L
from tests.kernels.helpers import compare


def _fns(act, alpha, alpha2=0.6):
    def fn(backend):
        def f(x, w, b, w2, b2):
            return L.linear(x, w, b, alpha=alpha, act=act, weight2=w2, bias2=b2, alpha2=alpha2, backend=backend)
        return f

    def ref(x, w, b, w2, b2):
        return L.linear_ref(x, w, b, alpha, act, w2, b2, alpha2)
    return fn("triton"), ref


def _autocast(fn):
    def f(*a):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(*a)
    return f


def _check(act, shape, has_bias, alpha, amp):
    *lead, K, N = shape
    glu = act == "swiglu"
    x = torch.randn(*lead, K)
    w, w2 = torch.randn(N, K) / K ** 0.5 * 2, torch.randn(N, K) / K ** 0.5 * 2
    b, b2 = torch.randn(N), torch.randn(N)
    inputs = [x, w, b if has_bias else None, w2 if glu else None, b2 if glu and has_bias else None]
    names = ["linear", "x", "weight"] + (["bias"] if has_bias else []) + \
        (["weight2"] + (["bias2"] if has_bias else []) if glu else [])
    fn, ref = _fns(act, alpha)
    up = [torch.randn(*lead, N)]
    if amp:
        # bf16 atol: one bf16 ulp (2^-8 relative) of a unit-size output, for elements where torch's
        # own error happens to be ~0 while the two round the fp32 sum differently
        compare(_autocast(fn), _autocast(ref), inputs, up, torch.float32, names, atol=4e-3, factor=2.0)
    else:
        compare(fn, ref, inputs, up, torch.float32, names, factor=2.0)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("act", L.ACTS)
def test_every_activation_odd_shape(act, amp):
    # (3, 13) rows of 45 -> 29: no side a multiple of 8 or of the 32-tile
    _check(act, (3, 13, 45, 29), has_bias=True, alpha=0.37, amp=amp)


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_no_bias_aligned_shape(act):
    # 64 x 48 -> 40: every stride a multiple of 8, the kernel's ALIGNED branch
    _check(act, (64, 48, 40), has_bias=False, alpha=1.7, amp=True)


def test_swiglu_bias_on_one_half_only():
    x, w, w2, b2 = torch.randn(11, 24), torch.randn(8, 24), torch.randn(8, 24), torch.randn(8)
    fn, ref = _fns("swiglu", 0.8)
    compare(fn, ref, [x, w, None, w2, b2], [torch.randn(11, 8)], torch.float32, ["linear", "x", "weight", "weight2",
                                                                             "bias2"], factor=2.0)


def test_relu_no_bias_alpha_one_fp32():
    _check("relu", (33, 40, 17), has_bias=False, alpha=1.0, amp=False)


@pytest.mark.slow
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_big_odd_shape(amp):
    # the Triton tutorial's irregular shape: 1823 x 781 -> 257
    _check("gelu", (1823, 781, 257), has_bias=True, alpha=0.5, amp=amp)


def test_bf16_inputs_give_bf16_and_grads_in_param_dtype():
    x = torch.randn(19, 24, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)  # an fp32 parameter under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = L.linear(x, w, None, alpha=0.5, act="gelu", backend="triton")
        r = L.linear_ref(x, w, None, 0.5, "gelu")
    assert y.dtype == r.dtype == torch.bfloat16
    gx, gw = torch.autograd.grad(y.float().sum(), (x, w))
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32


def test_no_grad_saves_nothing(monkeypatch):
    saved = []
    real = L._linear_fwd_launch
    monkeypatch.setattr(L, "_linear_fwd_launch", lambda *a: saved.append(a[-1]) or real(*a))
    x, w = torch.randn(9, 16), torch.randn(8, 16)
    with torch.no_grad():
        L.linear(x, w, act="gelu", backend="triton")
    L.linear(x, w.requires_grad_(), act="gelu", backend="triton")
    assert saved == [False, True]


def test_bad_arguments():
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(UserError, match="act 'tanh'"):
        L.linear(x, w, act="tanh", backend="triton")
    with pytest.raises(ValueError, match="do not fit"):
        L.linear(x, torch.randn(5, 7), backend="triton")
    with pytest.raises(ValueError, match="weight2"):
        L.linear(x, w, act="swiglu", backend="triton")


def test_gpu_tiles_are_the_documented_table():
    assert L.tile_for(4096, 4096, torch.bfloat16, "gelu", False) == L.TILES["large"]
    assert L.tile_for(256, 512, torch.bfloat16, "none", False) == L.TILES["small"]  # 8 tiles < one wave
    assert L.tile_for(4096, 4096, torch.bfloat16, "swiglu", False) == L.TILES["glu"]
    assert L.tile_for(4096, 4097, torch.bfloat16, "gelu", False, aligned=False) == L.TILES["unaligned"]
    assert L.tile_for(4096, 4096, torch.float32, "gelu", False) == L.TILES["fp32"]
    for m, n, k, warps, _ in L.TILES.values():  # wgmma: 64-row warp groups; K steps of 16-64
        assert m % 64 == 0 and n % 64 == 0 and k in (16, 32, 64) and warps in (4, 8)


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_gpt_mlp_takes_the_fused_kernel_unless_hooked(monkeypatch, act):
    from fastwidth.models.gpt import FeedForward
    calls = []
    real = L._linear_fwd_launch
    monkeypatch.setattr(L, "_linear_fwd_launch", lambda *a: calls.append(a[7]) or real(*a))
    ff = FeedForward(16, 24, act, bias=True)
    for p in ff.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ff.fc.mult, ff.proj.mult = 0.7, 1.3
    x = torch.randn(2, 5, 16)
    ref = ff(x)  # the torch path
    with dispatch.using("triton"):
        got = ff(x)
        assert calls == [act, "none"]  # fc (+ gate) with the activation fused, then proj
        calls.clear()
        seen = []
        h = ff.fc.register_forward_hook(lambda m, i, o: seen.append(o))
        hooked = ff(x)
        h.remove()
    assert calls == ["none"] * (3 if act == "swiglu" else 2) and len(seen) == 1  # the hook saw fc's output
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hooked, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["none", "swiglu"])
def test_registered_op_fake_and_autograd(act):
    # schema, fake (meta) shapes and autograd registration as torch.compile needs them
    x, w, b = (torch.randn(*s, requires_grad=True) for s in ((9, 16), (8, 16), (8,)))
    w2 = torch.randn(8, 16, requires_grad=True) if act == "swiglu" else None
    torch.library.opcheck(L._linear_fwd_op, (x, w, b, w2, None, 0.5, 1.5, act, True))
