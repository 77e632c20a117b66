import pytest
import torch

from fastwidth.kernels import readout_ce as rc
from tests.kernels.helpers import check_bound, compare, poisoned, readout_ce_fn

M_SHAPE, N, V = (3, 13), 33, 131


def _target(ignore: bool):
    t = torch.randint(0, V, M_SHAPE)
    if ignore:
        t[0, :3] = -100
    return t


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])  # bf16: second tier
@pytest.mark.parametrize("has_bias,z_loss,smooth,ignore,chunk", [
    (True, 0.0, 0.0, False, None), (False, 1e-3, 0.0, True, 16), (True, 0.0, 0.1, True, None),
    (True, 1e-2, 0.2, True, 7),
])
def test_readout_ce_matches_reference(monkeypatch, dtype, has_bias, z_loss, smooth, ignore, chunk):
    monkeypatch.setattr(rc, "CHUNK_ROWS", chunk)  # 16 and 7 rows: several chunks, a ragged last one
    t = _target(ignore)
    h, w, b = torch.randn(*M_SHAPE, N), torch.randn(V, N) * 0.5, torch.randn(V)
    kw = dict(z_loss=z_loss, label_smoothing=smooth)
    up = [torch.tensor(1.7), None, None, None]  # one shared upstream gradient for the loss
    compare(readout_ce_fn(t, 0.37, kw, "triton"), readout_ce_fn(t, 0.37, kw, "torch"), [h, w, b if has_bias else None], up, dtype,
            ["readout_ce", "h", "weight"] + (["bias"] if has_bias else []))
    hh, ww = h.to(dtype), w.to(dtype)
    got = rc.readout_ce_stats(hh, ww, t, multiplier=0.37, backend="triton", **kw).argmax
    ref = rc.readout_ce_stats(hh, ww, t, multiplier=0.37, backend="torch", **kw).argmax
    assert torch.equal(got, ref)


def test_large_common_logit_offset():
    # All logits near 3000: exp would overflow without the running max; fp32 keeps ~2e-4 resolution.
    t = _target(False)
    h, w = torch.randn(*M_SHAPE, N), torch.randn(V, N) * 0.5
    b = torch.full((V,), 3000.0) + torch.randn(V)
    r64 = rc.readout_ce_stats(h.double(), w.double(), t, multiplier=0.37, bias=b.double(), backend="torch")
    r32 = rc.readout_ce_stats(h, w, t, multiplier=0.37, bias=b, backend="torch")
    with poisoned():
        got = rc.readout_ce_stats(h, w, t, multiplier=0.37, bias=b, backend="triton")
    for name in ("loss", "token_loss", "lse", "true_logit"):
        check_bound(name, getattr(got, name).detach(), getattr(r64, name).detach(), getattr(r32, name).detach(), 1e-3)
    assert float(got.lse.min()) > 2990


def test_no_grad_forward_skips_gradients_and_matches():
    t = _target(True)
    h, w = torch.randn(*M_SHAPE, N), torch.randn(V, N)
    with torch.no_grad():
        a = rc.readout_cross_entropy(h, w, t, multiplier=2.0, backend="triton")
    b = rc.readout_cross_entropy(h, w, t, multiplier=2.0, backend="torch")
    torch.testing.assert_close(a, b.detach())


def test_mean_equals_torch_cross_entropy():
    t = _target(True)
    h, w, b = torch.randn(*M_SHAPE, N, dtype=torch.float64), torch.randn(V, N, dtype=torch.float64), torch.randn(V, dtype=torch.float64)
    logits = (h @ w.t()) * 0.37 + b
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), t.reshape(-1), label_smoothing=0.1)
    for backend in ("torch", "triton"):
        got = rc.readout_cross_entropy(h, w, t, multiplier=0.37, bias=b, label_smoothing=0.1, backend=backend)
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op name, output shape, output dtype) of every aten op run inside."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, torch.Tensor):
            self.ops.append((str(func.overloadpacket.__name__), tuple(first.shape), first.dtype))
        return out


def _launch(h, w, b, t):
    return rc._readout_ce_launch(h, w, b, t, 0.5, 0.0, 0.0, -100, True)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_weight_gradient_accumulates_in_place_and_no_bias_gradient_without_bias(monkeypatch, dtype):
    monkeypatch.setattr(rc, "CHUNK_ROWS", 8)  # 5 chunks
    h, w = torch.randn(37, N).to(dtype), (torch.randn(V, N) * 0.5).to(dtype)
    t = torch.randint(0, V, (37,))
    for bias in (None, torch.randn(V).to(dtype)):
        with _Ops() as rec:
            out = _launch(h, w, bias, t)
        vn = [op for op in rec.ops if op[1] == (V, N)]
        # the fp32 accumulator (zeros), its in-place addmm_ once a chunk, the final scale and cast:
        # no (V, N) product temporary a chunk, no add of one
        assert [op for op in vn if op[0] in ("mm", "add", "add_")] == [], vn
        assert sum(op[0] == "addmm_" and op[2] == torch.float32 for op in vn) == 5
        col_sums = [op for op in rec.ops if op[0] == "sum" and op[1] == (V,)]
        assert len(col_sums) == (0 if bias is None else 5), "bias gradient computed without a bias"
        assert out[7].numel() == (0 if bias is None else V)
        # the fp32 accumulation gives what one fp64 sum of the same dlogits would, rounded once
        z = rc.readout_logits(h.double(), w.double(), 0.5, None if bias is None else bias.double())
        ref = _launch(h.double(), w.double(), None if bias is None else bias.double(), t)[6]
        torch.testing.assert_close(out[6].double(), ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
        assert z.shape == (37, V)


def test_accumulate_fp32_is_one_fp32_sum():
    acc = torch.randn(9, 7)
    a, b = torch.randn(9, 33).bfloat16(), torch.randn(33, 7).bfloat16()
    want = acc.double() + a.double() @ b.double()
    rc.accumulate_fp32(acc, a, b)
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), want, rtol=1e-6, atol=1e-5)  # fp32 accuracy, not bf16's


def test_logit_rows_are_padded_to_a_multiple_of_8(monkeypatch):
    # 50,257 (GPT-2) and 131 here are not multiples of 8: each row of the chunk buffer starts 16-byte aligned
    buf = rc.logits_buffer(5, 50257, torch.empty(0, dtype=torch.bfloat16))
    assert buf.shape == (5, 50257) and buf.stride() == (50264, 1)
    strides = []
    real = rc._ce_rows_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(z, stride, *a, **kw):
                strides.append((z.shape[1], stride))
                return real[grid](z, stride, *a, **kw)
            return launch
    monkeypatch.setattr(rc, "_ce_rows_kernel", Spy())
    h, w, t = torch.randn(11, N), torch.randn(V, N), torch.randint(0, V, (11,))
    got = rc.readout_cross_entropy(h, w, t, multiplier=0.5, backend="triton")
    assert strides == [(V, 136)]
    torch.testing.assert_close(got, rc.readout_cross_entropy(h, w, t, multiplier=0.5, backend="torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_of_the_logit_rows_never_reaches_the_gradient(dtype):
    # Allocations filled with NaN (helpers.poisoned): the rows' padding columns (131 -> 136) must not
    # leak into dh = dz @ W. The CPU's bf16 GEMM (oneDNN on AMX) reads a strided operand past its
    # last column, so with unzeroed padding whole blocks of dh rows came out NaN.
    h, w = torch.randn(37, N).to(dtype), (torch.randn(V, N) * 0.5).to(dtype)
    t = torch.randint(0, V, (37,))
    with poisoned():
        buf = rc.logits_buffer(4, V, h)
        got = _launch(h, w, None, t)
    assert torch.equal(buf.as_strided((4, 136), (136, 1))[:, V:], torch.zeros(4, 136 - V, dtype=dtype))
    want = _launch(h, w, None, t)
    for name, g, r in zip(("loss", "dh", "dw"), (got[0], got[5], got[6]), (want[0], want[5], want[6])):
        assert torch.isfinite(g.float()).all(), f"{name} not finite"
        torch.testing.assert_close(g, r, rtol=0, atol=0, msg=f"{name} differs with poisoned memory")
