"""The native readout cross-entropy, RMSNorm/LayerNorm (with the residual add) and RoPE against
their torch references and float64, at odd shapes, fp32 and bf16, outputs and gradients."""
import pytest
import torch

from fastwidth.kernels import norm, readout_ce as rc, rope
from fastwidth.nn.attention import rope_tables
from tests.kernels.helpers import check_bound, compare, norm_fn, readout_ce_fn
from tests.kernels.native_skip import native_or_skip

native_or_skip()

M_SHAPE, N, V = (3, 13), 33, 131


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_bias,z_loss,smooth,ignore,chunk", [
    (True, 0.0, 0.0, False, None), (False, 1e-3, 0.0, True, 16), (True, 1e-2, 0.2, True, 7),
])
def test_readout_ce_matches_reference(monkeypatch, dtype, has_bias, z_loss, smooth, ignore, chunk):
    monkeypatch.setattr(rc, "CHUNK_ROWS", chunk)  # 16 and 7 rows: several chunks, a ragged last one
    t = torch.randint(0, V, M_SHAPE)
    if ignore:
        t[0, :3] = -100
    h, w, b = torch.randn(*M_SHAPE, N), torch.randn(V, N) * 0.5, torch.randn(V)
    kw = dict(z_loss=z_loss, label_smoothing=smooth)
    up = [torch.tensor(1.7), None, None, None]
    compare(readout_ce_fn(t, 0.37, kw, "native"), readout_ce_fn(t, 0.37, kw, "torch"), [h, w, b if has_bias else None], up, dtype,
            ["readout_ce", "h", "weight"] + (["bias"] if has_bias else []))
    hh, ww = h.to(dtype), w.to(dtype)
    got = rc.readout_ce_stats(hh, ww, t, multiplier=0.37, backend="native", **kw).argmax
    assert torch.equal(got, rc.readout_ce_stats(hh, ww, t, multiplier=0.37, backend="torch", **kw).argmax)


def test_readout_ce_large_vocabulary_crosses_blocks_and_a_large_offset():
    # 5003 classes: three 2048-wide blocks of the online logsumexp; logits near 3000 need the running max
    t = torch.randint(0, 5003, (29,))
    h, w = torch.randn(29, 17), torch.randn(5003, 17) * 0.5
    b = torch.full((5003,), 3000.0) + torch.randn(5003)
    r64 = rc.readout_ce_stats(h.double(), w.double(), t, multiplier=0.37, bias=b.double(), backend="torch")
    r32 = rc.readout_ce_stats(h, w, t, multiplier=0.37, bias=b, backend="torch")
    got = rc.readout_ce_stats(h, w, t, multiplier=0.37, bias=b, backend="native")
    for name in ("loss", "token_loss", "lse", "true_logit"):
        check_bound(name, getattr(got, name).detach(), getattr(r64, name).detach(), getattr(r32, name).detach(), 1e-3)
    assert torch.equal(got.argmax, r64.argmax)


def test_readout_ce_gradients_equal_float64_at_vocab_50257():
    # the production vocabulary at a few odd rows: loss and gradients within fp32 rounding of fp64
    t = torch.randint(0, 50257, (11,))
    h, w = torch.randn(11, 24, requires_grad=True), (torch.randn(50257, 24) * 0.3).requires_grad_()
    loss = rc.readout_cross_entropy(h, w, t, multiplier=0.5, backend="native")
    dh, dw = torch.autograd.grad(loss, (h, w))
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy((h64 @ w64.t()) * 0.5, t)
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    assert abs(loss.item() - ref.item()) < 1e-5
    torch.testing.assert_close(dh.double(), rh, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(dw.double(), rw, rtol=1e-4, atol=1e-8)


def test_readout_ce_nan_poisons_only_its_token():
    t = torch.randint(0, V, (7,))
    h, w = torch.randn(7, N), torch.randn(V, N)
    h[2, 5] = float("nan")
    got = rc.readout_ce_stats(h, w, t, backend="native")
    assert torch.isnan(got.token_loss[2]) and torch.isnan(got.loss)
    assert torch.isfinite(got.token_loss[[0, 1, 3, 4, 5, 6]]).all()


def test_readout_ce_no_grad_and_bad_target():
    t = torch.randint(0, V, (5,))
    h, w = torch.randn(5, N), torch.randn(V, N)
    with torch.no_grad():
        a = rc.readout_cross_entropy(h, w, t, multiplier=2.0, backend="native")
    torch.testing.assert_close(a, rc.readout_cross_entropy(h, w, t, multiplier=2.0, backend="torch"))
    t[1] = V
    with pytest.raises(RuntimeError, match=f"target {V} is outside"):
        rc.readout_cross_entropy(h, w, t, backend="native")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_rms,residual,has_w,has_b", [
    (True, False, True, False), (True, True, True, False), (True, False, False, False),
    (False, False, True, True), (False, True, True, True), (False, True, True, False),
])
def test_norm_matches_reference(dtype, is_rms, residual, has_w, has_b):
    n = 97  # 41 rows: a ragged last block of the 32-row dweight partials
    x, r = torch.randn(41, n) * 2 + 0.5, torch.randn(41, n)
    w, b = torch.randn(n), torch.randn(n)
    inputs = [x, r if residual else None, w if has_w else None, b if has_b else None]
    up = [torch.randn(41, n), torch.randn(41, n) if residual else None]
    names = ["norm", "x"] + (["residual"] if residual else []) + (["weight"] if has_w else []) + (["bias"] if has_b else [])
    compare(norm_fn(is_rms, residual, "native"), norm_fn(is_rms, residual, None), inputs, up, dtype, names)


def test_norm_rms_output_and_nan_row():
    x, r, w = torch.randn(5, 3, 48), torch.randn(5, 3, 48), torch.randn(48)
    x[1, 2, 7] = float("nan")
    y, s, rms = norm.rms_norm_residual(x, r, w, backend="native")
    yt, st, rmst = norm.rms_norm_residual(x, r, w, backend="torch")
    bad = torch.zeros(5, 3, dtype=torch.bool)
    bad[1, 2] = True
    assert torch.isnan(y[bad]).all() and torch.isnan(rms[bad]).all()
    torch.testing.assert_close(y[~bad], yt[~bad])
    torch.testing.assert_close(rms[~bad], rmst[~bad])
    torch.testing.assert_close(s, st, equal_nan=True)


def _rope(cos, sin, backend):
    return lambda x: rope.rope(x, cos, sin, backend=backend) if backend else rope.rope_ref(x, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_rope_matches_reference(dtype, transposed):
    B, H, T, D = 3, 5, 11, 14
    cos, sin = rope_tables(T + 4, D, 10000.0)  # tables longer than the sequence, as in the GPT
    x = torch.randn(B, T, H, D).transpose(1, 2) if transposed else torch.randn(B, H, T, D)
    up = [torch.randn(B, H, T, D)]
    compare(_rope(cos, sin, "native"), _rope(cos, sin, None), [x], up, dtype, ["rope", "x"])


def test_rope_is_exact_in_fp32_and_keeps_nan_local():
    cos, sin = rope_tables(9, 8, 10000.0)
    x = torch.randn(2, 3, 9, 8)
    torch.testing.assert_close(rope.rope(x, cos, sin, backend="native"), rope.rope_ref(x, cos, sin), rtol=0, atol=0)
    x[0, 1, 4, 2] = float("nan")
    got = rope.rope(x, cos, sin, backend="native")
    assert torch.isnan(got[0, 1, 4, [2, 6]]).all() and int(torch.isnan(got).sum()) == 2


def test_native_ops_under_cpu_autocast_match_torch():
    # bf16 activations with fp32 parameters, as a model under autocast: the same dtypes and values
    h, w, b = torch.randn(37, 19, requires_grad=True), torch.randn(101, 19, requires_grad=True), torch.randn(101)
    t = torch.randint(0, 101, (37,))
    res = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for be in ("native", "torch"):
            hb = torch.nn.functional.linear(h, torch.eye(19))
            loss = rc.readout_cross_entropy(hb, w, t, bias=b, multiplier=0.5, backend=be)
            y, _, _ = norm.rms_norm_residual(hb.detach(), hb.detach(), w[0].detach(), backend=be)
            res[be] = (loss, y, *torch.autograd.grad(loss, (h, w)))
    for a, c in zip(res["native"], res["torch"]):
        assert a.dtype == c.dtype
        torch.testing.assert_close(a.float(), c.float(), rtol=2e-2, atol=2e-2)
