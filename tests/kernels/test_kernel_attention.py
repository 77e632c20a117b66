import sys
import types

import pytest
import torch
import torch.nn.functional as F

from fastwidth.errors import UserError
from fastwidth.kernels import attention as A
from tests.kernels.helpers import compare

B, T = 2, 37


def _fn(scale, causal, backend):
    def f(q, k, v):
        return A.attention(q, k, v, scale=scale, causal=causal, backend=backend, return_max_logit=True)
    return f


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("H,Hkv,D", [(4, 2, 48), (2, 2, 32)])
def test_attention_matches_reference(dtype, causal, H, Hkv, D):
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    do = torch.randn(B, H, T, D)
    scale = 2.0 / D  # µP: attn_mult / head_dim, not 1/sqrt(D)
    compare(_fn(scale, causal, "triton"), _fn(scale, causal, "torch"), [q, k, v], [do, None], dtype,
            ["attention", "q", "k", "v"])


def test_attention_fp16_head_dim_128_strided_inputs():
    # q, k, v as the model makes them: (B, T, H, D) projections viewed as (B, H, T, D).
    D = 128
    qkv = torch.randn(B, T, 3, 2, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    compare(_fn(1 / D, True, "triton"), _fn(1 / D, True, "torch"), [q, k, v], [torch.randn(B, 2, T, D), None],
            torch.float16, ["attention", "q", "k", "v"])


def test_max_logit_is_the_largest_visible_scaled_logit():
    q, k, v = torch.randn(1, 2, T, 32), torch.randn(1, 2, T, 32), torch.randn(1, 2, T, 32)
    s = (q @ k.transpose(-1, -2)) * 0.25
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    for backend in ("triton", "torch", "math"):
        _, mx = A.attention(q, k, v, scale=0.25, causal=True, backend=backend, return_max_logit=True)
        torch.testing.assert_close(mx, s.amax(dim=(-1, -2)))


BACKENDS_HERE = ["torch", "math", "triton"] + (["flash"] if A.flash_available() else [])


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_changing_the_scale_changes_every_backend_output(backend):
    q, k, v = torch.randn(1, 2, T, 32), torch.randn(1, 2, T, 32), torch.randn(1, 2, T, 32)
    outs = [A.attention(q, k, v, scale=s, causal=True, backend=backend) for s in (1 / 32, 1 / 32 ** 0.5, 0.5)]
    for a, b in [(0, 1), (1, 2), (0, 2)]:
        diff = (outs[a] - outs[b]).abs()
        # every query row past the first (which sees only itself) must move
        assert (diff[:, :, 1:].amax(-1) > 1e-4).all(), f"{backend}: scale not applied"
    ref, _ = A.attention_ref(q.double(), k.double(), v.double(), 0.5, True)
    torch.testing.assert_close(outs[2].double(), ref, rtol=1e-4, atol=1e-4)


def test_each_backend_receives_the_scale(monkeypatch):
    q, k, v = torch.randn(1, 4, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)
    seen = {}
    real_sdpa = F.scaled_dot_product_attention

    def spy_sdpa(*a, **kw):
        seen["torch"] = kw.get("scale")
        return real_sdpa(*a, **kw)

    def fake_flash(q, k, v, softmax_scale=None, causal=False):
        seen["flash"] = softmax_scale  # (B, T, H, D) in, as flash_attn_func
        return torch.zeros_like(q)

    real_ref, real_op = A.attention_ref, A._attn_fwd_op
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fake_flash))
    monkeypatch.setattr(A, "attention_ref", lambda q, k, v, scale, causal: (seen.__setitem__("math", scale),
                                                                            real_ref(q, k, v, scale, causal))[1])
    monkeypatch.setattr(A, "_attn_fwd_op", lambda q, k, v, scale, causal: (seen.__setitem__("triton", scale),
                                                                           real_op(q, k, v, scale, causal))[1])
    for backend in ("torch", "math", "flash", "triton"):
        o = A.attention(q, k, v, scale=0.123, causal=True, backend=backend)
        assert o.shape == q.shape
    assert seen == {"torch": 0.123, "math": 0.123, "flash": 0.123, "triton": 0.123}


def test_errors_are_clear():
    q = torch.randn(1, 2, 8, 256)
    with pytest.raises(UserError, match="head_dim 256"):
        A.attention(q, q, q, scale=1.0, backend="triton")
    with pytest.raises(ValueError, match="multiple of Hkv"):
        A.attention(torch.randn(1, 3, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), scale=1.0)
    with pytest.raises(UserError, match="not one of"):
        A.attention(q, q, q, scale=1.0, backend="cudnn")
    if not A.flash_available():
        with pytest.raises(UserError, match="flash-attn"):
            A.attention(torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), scale=1.0,
                        backend="flash")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T_", [37, 64])
def test_masks_on_edge_tiles_only(causal, T_):
    # Every logit -120 (log2 units: exp2 of -lse overflows fp32): a padded key that is not masked
    # would add exp2(-lse) * 0 = NaN to dq, and an unmasked causal tile would see the future.
    # T=37 ends in a partial tile, T=64 on a tile edge (interpreter tiles are 32).
    D = 32
    q = torch.ones(1, 2, T_, D)
    k = -torch.ones(1, 2, T_, D) * (120.0 / D / 0.5)
    v = torch.randn(1, 2, T_, D)
    do = torch.randn(1, 2, T_, D)
    compare(_fn(0.5, causal, "triton"), _fn(0.5, causal, "math"), [q, k, v], [do, None], torch.float32,
            ["attention", "q", "k", "v"], atol=1e-4)


def test_delta_preprocess_kernel():
    o, do = torch.randn(2, 3, 37, 48), torch.randn(2, 3, 37, 48)
    delta = torch.full((2, 3, 37), float("nan"))
    A._attn_bwd_delta_kernel[(triton_cdiv(2 * 3 * 37, A.DELTA_ROWS),)](o, do, delta, 2 * 3 * 37, 48,
                                                                       BLOCK_M=A.DELTA_ROWS, BLOCK_D=64)
    torch.testing.assert_close(delta, (o.double() * do.double()).sum(-1).float(), rtol=1e-6, atol=1e-6)


def triton_cdiv(a, b):
    return -(-a // b)


def test_fp32_on_gpu_goes_to_sdpa_unless_asked(monkeypatch):
    # CPU tensors stand in for CUDA ones: the routing looks only at is_cuda, dtype and autocast
    calls = []
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(A.dispatch, "resolve", lambda backend, x, extra=(): backend or "triton")
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append("sdpa") or a[0])
    monkeypatch.setattr(A, "_attn_fwd_op", lambda q, k, v, s, c: calls.append("triton") or (q, None, None))
    q = torch.randn(1, 2, 8, 32)
    A.attention(q, q, q, scale=0.1)  # process default triton, fp32: SDPA
    A.attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), scale=0.1)  # bf16: Triton
    A.attention(q, q, q, scale=0.1, backend="triton")  # asked for: Triton
    assert calls == ["sdpa", "triton", "triton"]


def test_tile_configs_fit_the_causal_mask():
    for D in (64, 128):
        for m, n, _, _ in A.tile_configs("_attn_fwd_kernel", D) + A.tile_configs("_attn_bwd_dq_kernel", D):
            assert m % n == 0, (D, m, n)
        for m, n, _, _ in A.tile_configs("_attn_bwd_dkdv_kernel", D):
            assert n % m == 0, (D, m, n)


def test_fp32_triton_on_a_gpu_is_refused(monkeypatch):
    # the GPU tables hold bf16/fp16 tiles only (fp32 goes to SDPA); a launch that asks for fp32
    # is one clear line, not a compile of a tile nobody checked
    monkeypatch.setattr(A, "interpreting", lambda t: False)
    with pytest.raises(UserError, match="bf16 or fp16"):
        A._kernel_for(A._attn_fwd_kernel, torch.randn(2), 64)


def _gpu_tiles(name):
    seen = []
    for D in (64, 128):
        for m, n, _, _ in A.tile_configs(name, D):
            if (m, n) not in seen:
                seen.append((m, n))
    return seen


_TILE_SETS = list(zip(*(_gpu_tiles(k) for k in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"))))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tiles", _TILE_SETS)
def test_every_gpu_tile_shape_interpreted(monkeypatch, tiles, causal):
    # the (BLOCK_M, BLOCK_N) of each GPU config, run interpreted at T=150 (a partial last tile of
    # every size in the tables) with grouped heads: outputs and gradients against the reference
    for name, (m, n) in zip(("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"), tiles):
        monkeypatch.setitem(A.INTERP_TILES, name, dict(BLOCK_M=m, BLOCK_N=n))
    T_, D = 150, 32
    q, k, v, do = torch.randn(1, 2, T_, D), torch.randn(1, 1, T_, D), torch.randn(1, 1, T_, D), torch.randn(1, 2, T_, D)
    compare(_fn(1 / D, causal, "triton"), _fn(1 / D, causal, "math"), [q, k, v], [do, None], torch.float32,
            ["attention", "q", "k", "v"], atol=1e-4)
