import json

import numpy as np
import pytest
import torch

from fastwidth.stats.moments import PreactAccumulator, batch_moments_torch, histogram_ref, merge, moments_ref


def _batches(seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(17, 31), (5, 3, 7), (1,), (129,), (64, 13)]
    return [shift + scale * torch.randn(s, generator=g) ** 3 for s in shapes]  # skewed, heavy-tailed


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (100.0, 0.01), (-3.0, 4.0)])
def test_streaming_moments_equal_offline(shift, scale):
    xs = _batches(0, shift, scale)
    lo, hi = shift - 5 * scale, shift + 5 * scale
    acc = PreactAccumulator(bins=37, lo=lo, hi=hi)
    for x in xs:
        acc.update(x)
    got = acc.result()
    flat = torch.cat([x.reshape(-1) for x in xs])
    want = moments_ref(flat)
    for k in ("count", "min", "max"):
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-6)
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-6, abs=1e-6 * scale)
    # fp32 per-batch sums, float64 merge: relative error at fp32 level even at mean/std = 1e4
    for k in ("var", "skew", "kurt"):
        assert got[k] == pytest.approx(want[k], rel=2e-4, abs=1e-5), k
    np.testing.assert_array_equal(got["hist"], histogram_ref(flat, 37, lo, hi))
    assert got["hist"].sum() == flat.numel()  # out-of-range values sit in the edge bins


def test_merge_is_exact_on_float64():
    rng = np.random.default_rng(1)
    a, b = rng.standard_gamma(2.0, 13), rng.standard_gamma(2.0, 29) + 3

    def summ(v):
        d = v - v.mean()
        return (v.size, v.mean(), (d ** 2).sum(), (d ** 3).sum(), (d ** 4).sum())

    got = merge(summ(a), summ(b))
    want = summ(np.concatenate([a, b]))
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_batch_moments_row():
    x = torch.randn(7, 11) * 2 + 1
    row, hist = batch_moments_torch(x, 8, -3.0, 3.0)
    d = x.double().reshape(-1) - x.double().mean()
    want = [x.double().mean(), (d ** 2).sum(), (d ** 3).sum(), (d ** 4).sum(), x.min(), x.max()]
    np.testing.assert_allclose(row.double().numpy(), [float(w) for w in want], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(hist.numpy(), histogram_ref(x, 8, -3.0, 3.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stride", [1, 3])
def test_chunked_moments_equal_unchunked_in_a_bounded_workspace(dtype, stride):
    """Pieces of 64 elements (a 1001-element tensor: 16 pieces, the last one short) give the
    unchunked row and histogram, and the workspace never exceeds two pieces."""
    from fastwidth.stats import moments
    g = torch.Generator().manual_seed(7)
    x = (0.5 + 2.0 * torch.randn(7, 143, generator=g)).to(dtype)
    row, hist = batch_moments_torch(x, 13, -3.0, 4.0, hist_stride=stride, chunk=1 << 20)
    moments._WORKSPACE.clear()
    row_c, hist_c = batch_moments_torch(x, 13, -3.0, 4.0, hist_stride=stride, chunk=64)
    assert max(b.shape[1] for b in moments._WORKSPACE.values()) <= 64
    torch.testing.assert_close(row_c, row, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(hist_c.numpy(), hist.numpy())
    np.testing.assert_array_equal(hist_c.numpy(), histogram_ref(x.float().reshape(-1)[::stride], 13, -3.0, 4.0))


def test_flush_and_state_dict_round_trip():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(3, 5, generator=g) for _ in range(300)]  # crosses the 256-batch flush
    full = PreactAccumulator(16, -2.0, 2.0)
    half = PreactAccumulator(16, -2.0, 2.0)
    for i, x in enumerate(xs):
        full.update(x)
        if i == 150:
            state = json.loads(json.dumps(half.state_dict()))  # checkpoints hold JSON
            half = PreactAccumulator(1, 0.0, 1.0)
            half.load_state_dict(state)
        half.update(x)
    a, b = full.result(), half.result()
    for k in ("count", "mean", "var", "skew", "kurt", "min", "max"):
        assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-12)
    np.testing.assert_array_equal(a["hist"], b["hist"])
    want = moments_ref(torch.cat([x.reshape(-1) for x in xs]))
    assert a["kurt"] == pytest.approx(want["kurt"], rel=1e-4, abs=1e-5)


def test_empty_accumulator_and_bad_range():
    r = PreactAccumulator(4, -1.0, 1.0).result()
    assert r["count"] == 0 and r["hist"].sum() == 0
    with pytest.raises(ValueError):
        PreactAccumulator(4, 1.0, 1.0)


def test_fused_kernel_row_matches_torch_path():
    """kernels/stats.py (Triton interpreter on CPU) feeds the same (row, hist) as the torch path."""
    pytest.importorskip("triton")
    from fastwidth.stats.moments import batch_moments_fused

    g = torch.Generator().manual_seed(5)
    x = 0.7 + 1.3 * torch.randn(37, 53, generator=g)
    row_t, hist_t = batch_moments_torch(x, 19, -2.5, 4.0)
    row_f, hist_f = batch_moments_fused(x, 19, -2.5, 4.0)
    torch.testing.assert_close(row_f, row_t, rtol=1e-5, atol=1e-3)
    assert hist_f.sum() == x.numel()
    assert (hist_f - hist_t).abs().sum() <= 2  # a value on a bin edge may round to either side


def test_hist_stride_samples_each_batch():
    xs = _batches(4)
    acc = PreactAccumulator(bins=10, lo=-2.0, hi=2.0, hist_stride=3)
    for x in xs:
        acc.update(x)
    got = acc.result()
    flat = torch.cat([x.reshape(-1) for x in xs])
    assert got["count"] == flat.numel()                        # moments see every element
    assert got["kurt"] == pytest.approx(moments_ref(flat)["kurt"], rel=1e-4)
    sampled = torch.cat([x.reshape(-1)[::3] for x in xs])
    np.testing.assert_array_equal(got["hist"], histogram_ref(sampled, 10, -2.0, 2.0))


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_asinh_histogram_streaming_equals_offline(backend):
    """asinh units (stats/preact_range.py): the streamed histogram over batches, every 3rd element
    of each, equals float64 offline binning of asinh((x - c) / s) of those elements; the moments
    stay those of x; a saved state restores the units. The native op (CPU) gives its moments row,
    the histogram is the torch op's under both."""
    from fastwidth.stats import moments as mom

    if backend == "native":
        pytest.importorskip("fastwidth.kernels.native").load()
    xs = _batches(7, shift=1.5, scale=3.0)        # heavy tails: |x| up to ~100 s
    c, s = 1.0, 0.5
    acc = PreactAccumulator(bins=40, lo=-6.0, hi=6.0, hist_stride=3, asinh=(c, s))
    run = (lambda x, *a, **k: mom.batch_moments_fused(x, *a, backend="native", **k)) if backend == "native" \
        else mom.batch_moments_torch
    for x in xs:
        row, hist = run(x.detach(), acc.bins, acc.lo, acc.hi, hist_stride=3, asinh=acc.asinh)
        acc._counts.append(x.numel())
        acc._rows.append(row)
        acc._hists.append(hist)
    got = acc.result()
    flat = torch.cat([x.reshape(-1) for x in xs])
    sampled = torch.cat([x.reshape(-1)[::3] for x in xs])
    np.testing.assert_array_equal(got["hist"], histogram_ref(sampled, 40, -6.0, 6.0, asinh=(c, s)))
    assert got["kurt"] == pytest.approx(moments_ref(flat)["kurt"], rel=1e-4)
    assert got["max"] == pytest.approx(float(flat.max()), rel=1e-6) and got["asinh"] == (c, s)
    back = PreactAccumulator()
    back.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert back.asinh == (c, s)
    np.testing.assert_array_equal(back.result()["hist"], got["hist"])
    with pytest.raises(ValueError, match="scale > 0"):
        PreactAccumulator(asinh=(0.0, 0.0))


def test_out_of_range_fraction_counts_the_overflow_bins():
    """with_overflow's layout: values beyond the body land in the two one-bin-wide edge bins, and
    out_of_range_fraction is their share, here planted at 3 of 20 values on each side."""
    from fastwidth.stats.preact_range import Bins, out_of_range_fraction

    b = Bins("asinh", -2.0, 2.0, center=0.0, scale=1.0)
    lo, hi, n = b.accumulator(8)
    body = torch.sinh(torch.linspace(-1.9, 1.9, 14))
    x = torch.cat([body, torch.tensor([-1e3, -50.0, -4.0, 4.5, 60.0, 1e4])])   # |asinh| > 2.0 + 0.5
    acc = PreactAccumulator(n, lo, hi, asinh=b.asinh)
    acc.update(x)
    h = acc.result()["hist"]
    assert h[0] == 3 and h[-1] == 3 and h.sum() == 20
    assert out_of_range_fraction(h) == pytest.approx(6 / 20)
    assert out_of_range_fraction(np.zeros(5)) is None
    # raw-unit edges: the body's edges map back through c + s sinh(u)
    np.testing.assert_allclose(b.edges(n)[1:-1], np.sinh(np.linspace(-2.0, 2.0, 9)), rtol=1e-12)
