import math

import numpy as np
import pytest
import torch

from fastwidth.stats import metrics as M


def _hsic(k, l):
    p = k.shape[0]
    h = np.eye(p) - np.ones((p, p)) / p
    return np.trace(k @ h @ l @ h)


def test_cka_equals_hsic_formula_and_invariances():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 37))
    y = np.tanh(x @ rng.standard_normal((37, 11))) + 0.3 * rng.standard_normal((23, 11))
    kx, ky = x @ x.T / 37, y @ y.T / 11
    want = _hsic(kx, ky) / math.sqrt(_hsic(kx, kx) * _hsic(ky, ky))
    assert M.cka(kx, ky) == pytest.approx(want, rel=1e-10)
    q, _ = np.linalg.qr(rng.standard_normal((37, 37)))
    xr = 5.0 * x @ q                                # rotation and isotropic scaling
    assert M.cka(M.feature_kernel(torch.tensor(xr)), ky) == pytest.approx(want, rel=1e-5)
    assert M.cka(kx, kx) == pytest.approx(1.0)
    want_a = (kx * ky).sum() / (np.linalg.norm(kx) * np.linalg.norm(ky))
    assert M.kernel_alignment(kx, ky) == pytest.approx(want_a, rel=1e-10)
    assert math.isnan(M.kernel_alignment(np.zeros((3, 3)), kx[:3, :3]))


def test_feature_kernel():
    phi = torch.randn(9, 13)
    np.testing.assert_allclose(M.feature_kernel(phi).numpy(), (phi @ phi.T / 13).numpy(), rtol=1e-6)


def test_wasserstein_matches_sorted_samples():
    rng = np.random.default_rng(1)
    bins, lo, hi = 12, -3.0, 3.0
    centers = lo + (np.arange(bins) + 0.5) * (hi - lo) / bins
    a = rng.integers(0, bins, 400)
    b = np.clip(rng.integers(0, bins, 400) + 2, 0, bins - 1)
    h1, h2 = np.bincount(a, minlength=bins), np.bincount(b, minlength=bins)
    want = np.abs(np.sort(centers[a]) - np.sort(centers[b])).mean()  # W1 of equal-size samples
    assert M.wasserstein1_hist(h1, h2, lo, hi) == pytest.approx(want, rel=1e-12)
    assert M.wasserstein1_hist(h1, 3 * h1, lo, hi) == pytest.approx(0.0, abs=1e-12)  # normalization


def test_pointwise_metrics():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.5, 2.0, 1.0])
    assert M.true_logit_rmse(a, b) == pytest.approx(math.sqrt((0.25 + 0 + 4) / 3))
    assert M.top1_agreement(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3])) == pytest.approx(2 / 3)
    assert M.loss_gap(a, b) == pytest.approx(2.0 - 4.5 / 3)


def test_sketch_distance_estimates_full_logit_distance():
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(3000, 50, generator=g), torch.randn(3000, 50, generator=g)
    r = torch.randn(50, 32, generator=g) / math.sqrt(32)
    ca, cb = za - za.mean(-1, keepdim=True), zb - zb.mean(-1, keepdim=True)
    full = float(((ca - cb) ** 2).sum(-1).mean().sqrt())
    assert M.sketch_distance(ca @ r, cb @ r) == pytest.approx(full, rel=0.05)


def test_seed_variance_and_power_law():
    rng = np.random.default_rng(2)
    stack = rng.standard_normal((4, 50))
    assert M.seed_variance(stack) == pytest.approx(stack.var(0, ddof=1).mean(), rel=1e-12)
    assert math.isnan(M.seed_variance(stack[:1]))
    n = np.array([64, 128, 256, 512])
    slope, icpt = M.fit_power_law(n, 3.0 * n ** -0.5)
    assert slope == pytest.approx(-0.5) and icpt == pytest.approx(math.log(3.0))
    assert math.isnan(M.fit_power_law([64], [1.0])[0])
    assert M.fit_power_law([64, 128, 256], [1.0, float("nan"), 0.25])[0] == pytest.approx(-1.0)


def test_wasserstein_on_uneven_bins_matches_sorted_samples():
    """wasserstein1_binned with asinh-spaced centers: the W1 of the two point-mass samples, and
    wasserstein1_hist's value on equal bins."""
    rng = np.random.default_rng(2)
    bins = 15
    centers = np.sinh(np.linspace(-4, 4, bins))
    a = rng.integers(0, bins, 300)
    b = np.clip(rng.integers(0, bins, 300) + 3, 0, bins - 1)
    h1, h2 = np.bincount(a, minlength=bins), np.bincount(b, minlength=bins)
    want = np.abs(np.sort(centers[a]) - np.sort(centers[b])).mean()
    assert M.wasserstein1_binned(h1, h2, centers) == pytest.approx(want, rel=1e-12)
    even = -3.0 + (np.arange(bins) + 0.5) * 6.0 / bins
    assert M.wasserstein1_binned(h1, h2, even) == pytest.approx(M.wasserstein1_hist(h1, h2, -3.0, 3.0), rel=1e-12)
    assert math.isnan(M.wasserstein1_binned(h1, np.zeros(bins), centers))
