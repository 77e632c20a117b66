"""stats/ntk_across.py's spectral mechanism on planted truths: task power at chosen eigenvectors,
a target moved into slower modes (ΔC) apart from the spectrum's shape (discrepancy), the halves
baseline on pure-noise seeds, and kernel regression with a kernel that holds the target."""
import math

import pytest
import torch

from fastwidth.stats.ntk_across import (log_discrepancy, normalized_spectrum, pm1_target, ridge_regression_error,
                                        spectral_mechanism)

N = 40


def basis(seed=0):
    return torch.linalg.qr(torch.randn(N, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


LAM = torch.tensor([1.0 / (k + 1) for k in range(N)], dtype=torch.float64)      # distinct, descending


def kernel(Q, lam):
    return Q @ torch.diag(lam) @ Q.T


def planted_target(Q):
    """Power 0.5 on eigenvector 3, 0.3 on 8 and 0.2 on 21 (1-based): C(k) steps there."""
    return math.sqrt(0.5) * Q[:, 2] + math.sqrt(0.3) * Q[:, 7] + math.sqrt(0.2) * Q[:, 20]


def seeds_of(K, s=4):
    """Seeds that differ by a scale only: the same eigenvectors and normalized spectrum."""
    return [K * (1 + 0.05 * i) for i in range(s)]


def test_pm1_target_is_plus_one_on_the_class():
    assert pm1_target(torch.tensor([0, 1, 1, 0]), 1).tolist() == [-1.0, 1.0, 1.0, -1.0]


def test_task_power_steps_at_the_planted_eigenvectors_and_identical_kernels_give_zero():
    Q = basis()
    K = kernel(Q, LAM)
    d = spectral_mechanism({32: seeds_of(K), 64: seeds_of(2 * K)}, planted_target(Q), 64, k_max=24, k_c=16,
                           n_train=30, n_boot=30)
    for r in d["widths"]:
        c = r["task_power"]
        assert c[1] == pytest.approx(0.0, abs=1e-12) and c[2] == pytest.approx(0.5)
        assert c[7] == pytest.approx(0.8) and c[19] == pytest.approx(0.8) and c[20] == pytest.approx(1.0)
        assert r["c_k"] == pytest.approx(0.8) and r["c_k_ci"] == pytest.approx([0.8, 0.8])
        assert r["eigenvalues_norm"] == pytest.approx((LAM[:24] / LAM.sum()).tolist())
    n32 = d["widths"][0]
    assert n32["delta_c"] == pytest.approx(0.0, abs=1e-12) and n32["delta_c_ci"] == pytest.approx([0, 0], abs=1e-12)
    assert n32["discrepancy"] == pytest.approx(0.0, abs=1e-12)
    assert n32["discrepancy_ci"] == pytest.approx([0, 0], abs=1e-12)
    assert d["baseline"]["delta_c"] == pytest.approx(0.0, abs=1e-12)
    assert d["baseline"]["discrepancy"] == pytest.approx(0.0, abs=1e-12)


def test_target_moved_into_slower_modes_gives_delta_c_but_no_discrepancy():
    """Width 32 gives the target's eigenvector 3 the eigenvalue of rank 25 (a permutation of the same
    eigenvalues): ΔC(16) = 0.5 exactly, and the sorted spectrum, so the discrepancy, is unchanged."""
    Q = basis()
    lam = LAM.clone()
    lam[2], lam[24] = LAM[24], LAM[2]
    d = spectral_mechanism({32: seeds_of(kernel(Q, lam)), 64: seeds_of(kernel(Q, LAM))}, planted_target(Q), 64,
                           k_max=24, k_c=16, n_train=30, n_boot=30)
    n32 = d["widths"][0]
    assert n32["delta_c"] == pytest.approx(0.5)
    assert n32["delta_c_ci"][0] > 0.4
    assert n32["discrepancy"] == pytest.approx(0.0, abs=1e-9)


def test_discrepancy_of_a_planted_log_shift():
    """Top-32 eigenvalues × e^0.1: every log(λ_k/tr) moves by 0.1 − log(tr_N/tr_ref); RMS = its size."""
    lam = torch.tensor([1.0 / (k + 1) for k in range(64)], dtype=torch.float64)
    up = lam.clone()
    up[:32] *= math.exp(0.1)
    want = abs(0.1 - math.log(float(up.sum() / lam.sum())))
    assert log_discrepancy(normalized_spectrum(torch.diag(up), 32)[0],
                           normalized_spectrum(torch.diag(lam), 32)[0]) == pytest.approx(want)
    assert math.isnan(log_discrepancy(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])))


def _noisy(K, sigma, seeds, gen):
    out = []
    for _ in range(seeds):
        G = torch.randn(N, N, generator=gen, dtype=torch.float64)
        out.append(K + sigma * (G @ G.T) / N)                               # PSD seed noise
    return out


def test_halves_baseline_on_pure_noise_seeds_is_the_size_of_the_noise():
    """Every width draws its seeds from one distribution (no width effect): ΔC's intervals cover 0,
    the baseline's discrepancy is that of the cross-width comparisons (1/√2 of it expected) and
    doubles with the noise."""
    Q = basis()
    K, y = kernel(Q, LAM), planted_target(Q)
    base = {}
    for sigma in (0.002, 0.004):
        gen = torch.Generator().manual_seed(1)
        d = spectral_mechanism({w: _noisy(K, sigma, 8, gen) for w in (32, 64, 256)}, y, 256, k_max=16, k_c=8,
                               n_train=30, n_boot=30)
        base[sigma] = d["baseline"]["discrepancy"]
        cross = [r["discrepancy"] for r in d["widths"] if not r["reference"]]
        assert 0.5 < base[sigma] / (sum(cross) / len(cross)) < 3.0
        assert all(r["delta_c_ci"][0] <= 0 <= r["delta_c_ci"][1] for r in d["widths"] if not r["reference"])
        assert abs(d["baseline"]["delta_c"]) < 0.1
    assert 1.5 < base[0.004] / base[0.002] < 2.5


def test_kernel_regression_with_a_kernel_that_holds_the_target_has_no_error():
    y = pm1_target(torch.arange(N) % 2, 0)
    mse, sign = ridge_regression_error(torch.outer(y, y) + 1e-3 * torch.eye(N, dtype=torch.float64), y, 30, 1e-3)
    assert mse < 1e-4 and sign == 0.0
    mse, sign = ridge_regression_error(torch.eye(N, dtype=torch.float64), y, 30, 1e-3)   # no information: ŷ = 0
    assert mse == pytest.approx(1.0) and sign == 1.0


def test_intervals_are_clipped_to_the_statistics_range():
    """Replicates lifted above the point (seed noise lifts an RMS) reflect the basic interval below 0."""
    from fastwidth.stats.ntk_across import _ci
    samples = [0.1 + 0.5 * i / 99 for i in range(100)]
    assert _ci(0.1, samples, 8)[0] < 0
    lo, hi = _ci(0.1, samples, 8, 0.0)
    assert lo == 0.0 and hi >= 0.1
    assert _ci(0.1, samples, 2) is None                                    # < 3 seeds: no interval
