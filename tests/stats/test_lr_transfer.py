"""The learning-rate transfer estimator (stats/transfer.py) on losses whose optimum is known."""
import math

import numpy as np
import pytest

from fastwidth.stats.transfer import optima, optimum, refine_lrs, transfer_fit

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


# --------------------------------------------------------------------------- refinement (sweep.lr_refine)

SHIPPED = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]   # configs/transfer: steps of x3 and x3.33


def test_refine_lrs_cut_the_steps_beside_the_argmin_into_parts_of_at_most_root_two():
    x = np.log(SHIPPED)
    y = (x - math.log(1.2e-3)) ** 2                    # argmin 1e-3, its vertex side (the lower neighbour) above
    assert refine_lrs(SHIPPED, y, 1) == [[0.00132]]     # 1e-3 * 3^(1/4)
    assert refine_lrs(SHIPPED, y, 2) == [[0.00074, 0.00132]]   # 1e-3 * (3e-4/1e-3)^(1/4), 1e-3 * 3^(1/4)
    assert refine_lrs(SHIPPED, y, 3) == [[0.00074, 0.00132, 0.00173]]
    for k in (2, 4, 6, 8):
        got = refine_lrs(SHIPPED, y, k)[0]
        assert len(got) == k and all(3e-4 < v < 3e-3 and v != 1e-3 for v in got)   # inside the bracket
        assert np.diff(np.log(sorted(got + [1e-3]))).max() <= math.log(2 ** 0.5) + 0.01  # 3 digits' rounding
    bracket = np.log(sorted(refine_lrs(SHIPPED, y, 6)[0] + [3e-4, 1e-3, 3e-3]))     # 6: the bracket cut in 4 + 4
    assert len(bracket) == 9 and np.diff(bracket).max() <= math.log(2 ** 0.5) + 0.01
    # the grid's top edge: the first point goes outward, with the step of the side it has
    top = refine_lrs(SHIPPED, -x, 1)[0]
    assert top == [pytest.approx(0.1 * (0.1 / 0.03) ** 0.25, rel=5e-3)] and top[0] > 0.1
    # beside a diverged lr the refinement still goes toward it; a width with nothing finite gets none
    wall = y.copy()
    wall[3:] = np.inf
    assert refine_lrs(SHIPPED, np.stack([wall, np.full(7, np.nan)]), 2) == [[0.00074, 0.00132], []]


def test_union_grid_optima_skip_learning_rates_a_width_did_not_train():
    lrs = sorted(SHIPPED + [7.4e-4, 1.32e-3, 2.2e-3, 4.1e-3])
    x = np.log(lrs)
    y = 0.5 * (x - math.log(1.5e-3)) ** 2
    only = np.array([lr in SHIPPED or lr in (1.32e-3, 2.2e-3) for lr in lrs])  # this width's own refined lrs
    partial = np.where(only, y, np.nan)
    eta, edge = optima(lrs, np.stack([y, partial]))
    assert eta == pytest.approx([1.5e-3, 1.5e-3], rel=1e-9) and not edge.any()
    # a nan beside the minimum is skipped, not taken for a diverged lr (inf: the edge, as before)
    gap = partial.copy()
    gap[lrs.index(1e-3)] = np.nan
    assert optimum(lrs, gap) == (pytest.approx(1.5e-3, rel=1e-9), False)
    gap[lrs.index(1e-3)] = np.inf
    assert optimum(lrs, gap)[1] is True


def toy_losses(lrs, widths=WIDTHS, alpha=0.135):
    """A fixed bowl 0.08 (log η - log 3e-2)² plus a wall 0.05 exp((log η - log η_w(N)) / 0.5) of
    divergence at η_w(N) = 1e-2 (N/64)^alpha, receding with width: the optimum drifts by +0.084
    over 64-512 (and no loss curve is a parabola in log η)."""
    u = np.log(np.asarray(lrs, dtype=np.float64))[None, :]
    wall = np.log(1e-2) + alpha * np.log(np.asarray(widths, dtype=np.float64) / 64)[:, None]
    return 0.08 * (u - np.log(3e-2)) ** 2 + 0.05 * np.exp((u - wall) / 0.5)


def _toy_drift(lrs, y):
    return transfer_fit(lrs, WIDTHS, y[:, :, None, None], n_boot=0)


def test_refinement_reads_the_toy_drift_the_coarse_grid_misses():
    fine = np.exp(np.linspace(np.log(1e-3), np.log(1e-1), 40001))
    truth = np.polyfit(np.log(WIDTHS), np.log(fine[np.argmin(toy_losses(fine), axis=1)]), 1)[0]
    assert truth == pytest.approx(0.084, abs=0.001)
    coarse = _toy_drift(SHIPPED, toy_losses(SHIPPED))
    assert abs(coarse["slope"] - truth) > 0.03 and coarse["below_grid_resolution"] is True
    # resolution: half the widest local step (log 10^½ around 1e-2) across log(512/64)
    assert coarse["resolution"] == pytest.approx(0.5 * 0.5 * math.log(10) / math.log(8), rel=0.01)
    root2 = list(2.0 ** np.arange(-14, -3.4, 0.5))
    assert _toy_drift(root2, toy_losses(root2))["slope"] == pytest.approx(truth, abs=0.005)
    add = refine_lrs(SHIPPED, toy_losses(SHIPPED), 4)
    union = sorted(set(SHIPPED).union(*add))
    y = np.where([[lr in SHIPPED or lr in mine for lr in union] for mine in add], toy_losses(union), np.nan)
    fit = _toy_drift(union, y)
    assert fit["slope"] == pytest.approx(truth, abs=0.005) and fit["resolution"] < coarse["resolution"] / 3
    assert fit["below_grid_resolution"] is False


def test_a_drift_beyond_the_grid_step_is_resolved():
    eta = 4e-3 * (np.array(WIDTHS) / 64.0) ** 0.35                     # resolutions 0.28 (64-512), 0.42 (128-512)
    fit = transfer_fit(LRS, WIDTHS, losses(eta), ranges={"128-512": WIDTHS[1:]}, n_boot=0)
    step = math.log(LRS[1] / LRS[0])                                 # a regular grid: one step everywhere
    assert fit["resolution"] == pytest.approx(0.5 * step / math.log(8))
    assert fit["below_grid_resolution"] is False and fit["ranges"]["128-512"]["below_grid_resolution"] is True
    assert fit["ranges"]["128-512"]["resolution"] == pytest.approx(0.5 * step / math.log(4))


def test_a_drift_whose_optima_all_sit_at_the_grids_edge_is_not_identified():
    """Losses falling toward the largest η at every width: every η* is the grid's last point, the
    slope 0 is the grid's, and the fit says the drift is not identified (all, sub-ranges, local)."""
    lrs, widths = [1e-3, 2e-3, 4e-3], [32, 64, 128]
    falling = np.array([[3.0, 2.0, 1.0]] * 3)[:, :, None, None].repeat(2, axis=2)    # (W, R, S=2, P=1)
    fit = transfer_fit(lrs, widths, falling, n_boot=20)
    assert all(fit["edge"].values()) and fit["slope"] == 0.0
    assert "edge" in fit["not_identified"] and fit["ranges"]["all"]["not_identified"]
    assert all(loc["not_identified"] for loc in fit["local"])
    bowl = np.array([[2.0, 1.0, 2.0]] * 3)[:, :, None, None].repeat(2, axis=2)
    inside = transfer_fit(lrs, widths, bowl, n_boot=20)
    assert inside["not_identified"] is None and not any(loc["not_identified"] for loc in inside["local"])
    mixed = transfer_fit(lrs, widths, np.concatenate([falling[:1], bowl[1:]]), n_boot=20)
    assert mixed["not_identified"] is None and mixed["local"][0]["not_identified"] is None
