"""The seed-ensemble estimators against direct formulas and cases known in closed form."""
import math

import numpy as np
import pytest
import torch

from fastwidth.stats import metrics as M
from fastwidth.stats.ensemble import (EnsembleCurve, SeedEnsembles, basic_ci, covering, fit_inverse_e, masked_slopes,
                                      member_subsets, tail_mean_ci)


def synthetic(widths, n_seeds, points=400, bias=0.0, var_scale=4.0, ref=None, seed=0):
    """f_{N,s} = μ + bias·u·(1/N - 1/ref)·N0 + sqrt(var_scale/N)·ε: V_N = var_scale/N exactly in expectation."""
    rng = np.random.default_rng(seed)
    ref = ref or max(widths)
    mu, u = rng.standard_normal(points), rng.standard_normal(points)
    true = {}
    for w in widths:
        shift = bias * u * (widths[0] / w - widths[0] / ref)
        true[w] = torch.tensor(mu + shift + math.sqrt(var_scale / w) * rng.standard_normal((n_seeds, points)))
    return true, {w: list(range(n_seeds)) for w in widths}


def test_gram_statistics_equal_direct_formulas():
    true, seeds = synthetic([16, 32, 64], 3, bias=1.0)
    seeds[16] = [0, 5, 1]                          # seed 5 has no reference partner: compared with seed 0
    rows = SeedEnsembles(true, seeds, 64).width_rows(n_boot=0)
    for w in (16, 32):
        v_n, v_ref = M.seed_variance(true[w]), M.seed_variance(true[64])
        b = M.ensemble_bias(true[w].mean(0), true[64].mean(0))
        assert rows[w]["seed_variance"] == pytest.approx(v_n, rel=1e-10)
        assert rows[w]["bias"] == pytest.approx(b, rel=1e-9)
        assert rows[w]["bias_sq_debiased"] == pytest.approx(b * b - v_n / 3 - v_ref / 3, rel=1e-9, abs=1e-12)
    assert rows[64]["bias"] == 0.0 and "bias_sq_debiased" not in rows[64]
    fit = SeedEnsembles(true, seeds, 64).fit_row(n_boot=0)
    partner = {0: 0, 5: 0, 1: 1}
    rmse16 = np.mean([M.true_logit_rmse(true[16][j], true[64][partner[s]]) for j, s in enumerate(seeds[16])])
    rmse32 = np.mean([M.true_logit_rmse(true[32][j], true[64][j]) for j in range(3)])
    assert fit["rmse_slope"] == pytest.approx(M.fit_power_law([16, 32], [rmse16, rmse32])[0], rel=1e-9)
    var = [M.seed_variance(true[w]) for w in (16, 32, 64)]
    assert fit["variance_slope"] == pytest.approx(M.fit_power_law([16, 32, 64], var)[0], rel=1e-9)
    assert fit["rmse_slope_ci"] is None and fit["n_boot"] == 0


def test_debiased_bias_is_unbiased_where_the_raw_one_is_not():
    """b² = 0 and V_N = 4/N: raw b̂² averages V_N/S + V_ref/S, the debiased one averages 0."""
    raw, deb = [], []
    for rep in range(200):
        true, seeds = synthetic([16, 64], 2, points=50, seed=rep)
        r = SeedEnsembles(true, seeds, 64).width_rows(n_boot=0)[16]
        raw.append(r["bias"] ** 2)
        deb.append(r["bias_sq_debiased"])
    expect_raw = 4 / 16 / 2 + 4 / 64 / 2
    assert np.mean(raw) == pytest.approx(expect_raw, rel=0.05)
    se = np.std(deb) / math.sqrt(len(deb))
    assert abs(np.mean(deb)) < 3 * se and min(deb) < 0            # unbiased for 0, hence sometimes negative


def test_debiased_bias_recovers_a_known_bias():
    """The width-16 ensemble is shifted by 0.5·(1 - 16/64)·u from the reference: b² = 0.375² mean u²."""
    true, seeds = synthetic([16, 64], 4, points=20000, bias=0.5)
    rng = np.random.default_rng(0)
    rng.standard_normal(20000)                                        # μ, then u, as synthetic draws them
    want = 0.375 ** 2 * float(np.mean(rng.standard_normal(20000) ** 2))
    got = SeedEnsembles(true, seeds, 64).width_rows(n_boot=0)[16]
    assert got["bias_sq_debiased"] == pytest.approx(want, rel=0.03)
    assert got["bias"] ** 2 > want + 0.9 * (4 / 16 + 4 / 64) / 4         # the raw one adds V_N/S + V_ref/S


def test_bootstrap_interval_covers_the_true_variance_slope():
    true, seeds = synthetic([32, 64, 128, 256, 512], 6)
    fit = SeedEnsembles(true, seeds, 512).fit_row(n_boot=500)
    lo, hi = fit["variance_slope_ci"]
    assert lo < -1.0 < hi and lo < fit["variance_slope"] < hi and hi - lo > 0.02
    assert fit["n_boot"] == 500 and fit["ci_level"] == 0.95
    # RMSE² = a (1/N + 1/N_ref) + β²(1/N - 1/N_ref)² with V_N = 4/N and no bias: a = 4, β² = 0,
    # and no exponent (nothing to take one of), with the reason
    assert fit["rmse2_a"] == pytest.approx(4.0, rel=0.15)
    assert fit["bias_beta_sq_ci"][0] < 0 < fit["bias_beta_sq_ci"][1]
    assert fit["bias_exponent"] is None and fit["bias_exponent_ci"] is None
    assert "no bias detected" in fit["bias_exponent_reason"]
    assert "rmse2_bias_sq" not in fit and "bias_debiased_slope" not in fit
    assert fit["rmse_slope_ci"][0] < fit["rmse_slope"] < fit["rmse_slope_ci"][1]
    # two seeds: every valid resample is the original pair, so no interval is claimed
    true2 = {w: t[:2] for w, t in true.items()}
    fit2 = SeedEnsembles(true2, {w: [0, 1] for w in true2}, 512).fit_row(n_boot=200)
    assert fit2["variance_slope_ci"] is None and math.isfinite(fit2["variance_slope"])


def test_bootstrap_intervals_cover_at_about_their_level():
    """Over 200 synthetic sweeps (S = 6, b = 0, V_N = 4/N) the 95% intervals of b² and of the V_N
    slope cover the truth in most of them; a percentile interval of the debiased b̂² would not
    (its replicates center on the raw b̂², V_N/S + V_ref/S too high)."""
    cover_b2 = cover_slope = 0
    reps = 200
    for rep in range(reps):
        true, seeds = synthetic([32, 64, 128, 256], 6, points=60, seed=1000 + rep)
        est = SeedEnsembles(true, seeds, 256)
        lo, hi = est.width_rows(n_boot=200, seed=rep)[32]["bias_sq_debiased_ci"]
        cover_b2 += lo <= 0 <= hi
        lo, hi = est.fit_row(n_boot=200, seed=rep)["variance_slope_ci"]
        cover_slope += lo <= -1 <= hi
    assert cover_b2 / reps > 0.85 and cover_slope / reps > 0.85, (cover_b2, cover_slope)


def test_bootstrap_is_deterministic():
    true, seeds = synthetic([16, 32, 64], 4)
    a = SeedEnsembles(true, seeds, 64).fit_row(n_boot=100)
    b = SeedEnsembles(true, seeds, 64).fit_row(n_boot=100)
    assert a == b


def test_masked_slopes_equal_fit_power_law():
    rng = np.random.default_rng(3)
    x = np.array([8, 16, 32, 64, 128])
    y = np.exp(rng.standard_normal((7, 5)))
    y[2, 1] = -1.0
    y[3, :4] = 0.0                                                    # one point left: no slope
    got = masked_slopes(x, y)
    for row, g in zip(y, got):
        want = M.fit_power_law(x, row)[0]
        assert (math.isnan(g) and math.isnan(want)) or g == pytest.approx(want, rel=1e-10)


def test_basic_ci():
    # replicates spread 2.5..97.5 around a bootstrap-world truth of 50: T = 10 gets [10 - 47.5, 10 + 47.5]
    assert basic_ci(10.0, np.arange(101.0), 50.0) == pytest.approx([-37.5, 57.5])
    assert basic_ci(1.0, np.array([1.0, np.nan, np.nan]), 1.0) is None


def test_ensemble_curve_closed_form():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (40,), generator=g)
    curve = EnsembleCurve(3)
    curve.add(logits[:, :25], y[:25])                                 # streamed in two chunks
    curve.add(logits[:, 25:], y[25:])
    out = curve.result()
    ce = torch.nn.functional.cross_entropy
    single = np.mean([float(ce(logits[i], y)) for i in range(3)])
    pairs = np.mean([float(ce(logits[list(p)].mean(0), y)) for p in ((0, 1), (0, 2), (1, 2))])
    assert out["ensemble_loss"] == pytest.approx([single, pairs, float(ce(logits.mean(0), y))], rel=1e-12)
    acc_full = float((logits.mean(0).argmax(-1) == y).double().mean())
    assert out["ensemble_acc"][-1] == pytest.approx(acc_full)
    # L∞'s jackknife: leaving member i out, the curve over the other two is (mean single loss, pair loss)
    loo = []
    for i in range(3):
        rest = [j for j in range(3) if j != i]
        l1 = np.mean([float(ce(logits[j], y)) for j in rest])
        l2 = float(ce(logits[rest].mean(0), y))
        loo.append(2 * l2 - l1)                                       # L∞ of L(E) = L∞ + c/E through E = 1, 2
    se = math.sqrt(2 / 3 * float(((np.array(loo) - np.mean(loo)) ** 2).sum()))
    lo, hi = out["ensemble_loss_inf_ci"]
    assert (hi - lo) / 2 == pytest.approx(4.3027 * se, rel=1e-3) and lo < out["ensemble_loss_inf"] < hi
    two = EnsembleCurve(2)
    two.add(logits[:2], y)
    assert two.result()["ensemble_loss_inf_ci"] is None                # fewer than MIN_SEEDS_LINF_CI
    same = EnsembleCurve(4)
    same.add(logits[:1].expand(4, -1, -1), y)                         # identical members: flat L(E)
    assert np.ptp(same.result()["ensemble_loss"]) < 1e-12


def test_fit_inverse_e_and_subsets():
    inf, c = fit_inverse_e([2 + 0.5 / e for e in range(1, 6)])
    assert inf == pytest.approx(2.0) and c == pytest.approx(0.5)
    assert math.isnan(fit_inverse_e([1.0])[0])
    assert len(member_subsets(4, 2)) == 6 and len(member_subsets(12, 6, limit=32)) == 32
    assert len(set(member_subsets(12, 6, limit=32))) == 32


def test_tail_mean_ci_is_the_late_mean_and_covers_the_mean_at_about_its_level():
    m = np.array([[1.0, 2.0], [3.0, np.nan], [5.0, 6.0]])          # seed 1 lacks the second evaluation
    value, ci = tail_mean_ci(m, n_boot=200)
    assert value == pytest.approx((3.0 + 4.0) / 2)                    # mean over columns of column seed means
    assert ci[0] <= value <= ci[1] and ci[1] - ci[0] > 1.0
    assert tail_mean_ci(np.full((4, 3), 2.5), n_boot=50)[1] == pytest.approx([2.5, 2.5])
    assert tail_mean_ci(m[:2], n_boot=50)[1] is None                  # 2 seeds: no interval
    rng, hits, reps = np.random.default_rng(0), 0, 300
    for r in range(reps):                                             # seeds ~ N(1, 1): the truth is 1
        lo, hi = tail_mean_ci(1.0 + rng.standard_normal((8, 1)) + np.zeros((8, 3)), n_boot=300, seed=r)[1]
        hits += lo <= 1.0 <= hi
    # the basic bootstrap of a mean of 8 normal seeds covers P(|t_7| < 1.96 sqrt(7/8)) = 0.89
    assert 0.8 < hits / reps < 0.96, hits


def test_width_rows_carry_intervals_that_hold_their_points_and_the_truth():
    cover, reps = {"v": 0, "r": 0}, 60
    for r in range(reps):
        true, seeds = synthetic([16, 32, 64], 6, var_scale=4.0, seed=r)
        rows = SeedEnsembles(true, seeds, 64).width_rows(n_boot=300, seed=r)
        for w in (16, 32, 64):
            lo, hi = rows[w]["seed_variance_ci"]
            assert lo <= rows[w]["seed_variance"] <= hi
            cover["v"] += w == 32 and lo <= 4.0 / 32 <= hi
        lo, hi = rows[32]["true_logit_rmse_ci"]
        assert lo <= rows[32]["true_logit_rmse"] <= hi and "true_logit_rmse" not in rows[64]
        cover["r"] += lo <= math.sqrt(4.0 / 32 + 4.0 / 64) <= hi     # E[RMSE²] = V_N + V_ref, b = 0
    assert cover["v"] / reps > 0.8 and cover["r"] / reps > 0.8, cover
    two = SeedEnsembles(*synthetic([16, 32], 2), 32).width_rows(n_boot=100)
    assert two[16]["seed_variance_ci"] is None and two[16]["true_logit_rmse_ci"] is None


def test_covering():
    assert covering([1.0, 2.0], 0.5) == [0.5, 2.0] and covering([1.0, 2.0], 1.5) == [1.0, 2.0]
    assert covering(None, 1.0) is None


def test_mean_rmse_is_the_raw_bias_and_its_interval_holds_it_and_the_target():
    """||f̄_N - f̄_ref||_rms with a planted gap 0.3 (seed noise 0.1 over 6 seeds: target
    sqrt(0.09 + 2 * 0.01 / 6) = 0.3055); its log-scale interval holds the value and the target."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal(500)
    true = {16: torch.tensor(base + 0.3 + 0.1 * rng.standard_normal((6, 500))),
            64: torch.tensor(base + 0.1 * rng.standard_normal((6, 500)))}
    est = SeedEnsembles(true, {16: list(range(6)), 64: list(range(6))}, 64)
    (v, ci), = est.mean_rmse(500).values()
    direct = float(torch.sqrt(((true[16].mean(0) - true[64].mean(0)) ** 2).mean()))
    assert v == pytest.approx(direct) == pytest.approx(est.width_rows(0)[16]["bias"])
    assert ci[0] <= v <= ci[1] and ci[0] <= math.sqrt(0.09 + 0.02 / 6) <= ci[1] and ci[1] - ci[0] < 0.1
    (_, none), = SeedEnsembles({w: t[:2] for w, t in true.items()}, {16: [0, 1], 64: [0, 1]}, 64).mean_rmse().values()
    assert none is None
