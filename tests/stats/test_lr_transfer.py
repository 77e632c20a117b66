"""The learning-rate transfer estimator (stats/transfer.py) on losses whose optimum is known."""
import math

import numpy as np
import pytest

from fastwidth.stats.transfer import optima, optimum, transfer_fit

WIDTHS = [64, 128, 256, 512]
LRS = list(10 ** np.linspace(-4, -1, 7))


def losses(eta_star, n_seeds=3, n_examples=1, seed_noise=0.0, example_noise=0.0, seed=0):
    """(W, R, S, P): 0.3 (log η - log η*_N)² plus noise per member and lr (seeds) or per example (shared by seeds)."""
    rng = np.random.default_rng(seed)
    x = np.log(LRS)
    base = 0.3 * (x[None, :] - np.log(eta_star)[:, None]) ** 2                    # (W, R)
    out = base[:, :, None, None] + np.zeros((len(WIDTHS), len(LRS), n_seeds, n_examples))
    out += seed_noise * rng.standard_normal((len(WIDTHS), len(LRS), n_seeds, 1))
    out += example_noise * rng.standard_normal((len(WIDTHS), len(LRS), 1, n_examples))
    return out + rng.standard_normal(n_examples)                  # each example's own difficulty: cancels


def test_vectorized_optima_equal_the_parabola_vertex():
    x = np.log(LRS)
    y = 0.5 * (x - math.log(2e-3)) ** 2
    assert optimum(LRS, y) == (pytest.approx(2e-3), False)
    eta, edge = optima(LRS, np.stack([y, y[::-1], np.full(7, np.nan)]))
    assert eta[0] == pytest.approx(2e-3) and not edge[0]
    assert eta[1] == pytest.approx(math.exp(x[0] + x[-1] - math.log(2e-3))) and not edge[1]
    assert math.isnan(eta[2]) and edge[2]
    y2 = y.copy()
    y2[3] = np.inf                                                     # a diverged lr beside the minimum
    assert optimum(LRS, y2)[1] is True


def test_noiseless_drift_and_local_slopes_are_exact():
    eta = 4e-3 * (np.array(WIDTHS) / 64.0) ** 0.2
    fit = transfer_fit(LRS, WIDTHS, losses(eta), ranges={"128-512": WIDTHS[1:]}, n_boot=50)
    assert fit["slope"] == pytest.approx(0.2, abs=1e-9) and fit["ci"] == pytest.approx([0.2, 0.2], abs=1e-9)
    assert all(loc["slope"] == pytest.approx(0.2, abs=1e-9) for loc in fit["local"])
    # all of the drift in the first step next to the base width: η* doubles from 64 to 128, then stays
    step = np.array([4e-3, 8e-3, 8e-3, 8e-3])
    fit = transfer_fit(LRS, WIDTHS, losses(step), ranges={"128-512": WIDTHS[1:]}, n_boot=0)
    assert [loc["slope"] for loc in fit["local"]] == pytest.approx([1.0, 0.0, 0.0], abs=1e-9)
    assert fit["ranges"]["128-512"]["slope"] == pytest.approx(0.0, abs=1e-9)
    assert fit["slope"] == pytest.approx(np.polyfit(np.log(WIDTHS), np.log(step), 1)[0])
    assert fit["ranges"]["128-512"]["widths"] == [128, 256, 512] and fit["ci"] is None


def test_the_example_bootstrap_covers_what_a_seed_bootstrap_misses():
    """Identical seeds and a noisy evaluation: resampling seeds gives a zero-width interval that misses
    the truth; resampling the examples too covers it at about its level."""
    eta = 4e-3 * (np.array(WIDTHS) / 64.0) ** 0.2
    hits, seeds_only_hits, reps = 0, 0, 40
    for r in range(reps):
        L = losses(eta, n_examples=400, example_noise=1.0, seed=r)  # mean noise per member 0.05
        lo, hi = transfer_fit(LRS, WIDTHS, L, n_boot=200, seed=r)["ci"]
        hits += lo <= 0.2 <= hi
        slo, shi = transfer_fit(LRS, WIDTHS, L.mean(-1, keepdims=True), n_boot=50, seed=r)["ci"]
        seeds_only_hits += slo <= 0.2 <= shi
    assert hits / reps >= 0.8 and seeds_only_hits / reps < 0.2, (hits, seeds_only_hits)


def test_seed_noise_widens_the_interval_and_diverged_members_never_win():
    eta = np.full(4, 3e-3)
    quiet = transfer_fit(LRS, WIDTHS, losses(eta, seed_noise=0.002), n_boot=200)
    noisy = transfer_fit(LRS, WIDTHS, losses(eta, seed_noise=0.05), n_boot=200)
    assert np.diff(noisy["ci"]) > 3 * np.diff(quiet["ci"])
    assert noisy["ci"][0] <= 0.0 <= noisy["ci"][1]
    L = losses(eta)
    best = int(np.argmin(L[0, :, 0, 0]))
    L[0, best, 1] = np.inf                                             # one seed diverged at the best lr
    fit = transfer_fit(LRS, WIDTHS, L, n_boot=0)
    assert fit["edge"][64] and fit["optima"][64] != pytest.approx(LRS[best])
    with pytest.raises(ValueError):
        transfer_fit(LRS[:3], WIDTHS, L)
