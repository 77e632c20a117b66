"""The bias model (stats/bias_model.py) and the small-sample interval expansion (stats/ensemble.py),
against closed forms and planted truths."""
import math

import numpy as np
import pytest
import torch

from fastwidth.stats.bias_model import P_GRID, bias_x, exponent_reason, fit_beta_sq, fit_exponent
from fastwidth.stats.calibrate import Sweep
from fastwidth.stats.ensemble import SeedEnsembles, expansion, t_quantile

WIDTHS = [32, 64, 128, 256]
REF = 512


def test_t_quantile_and_expansion_match_tables():
    # Student-t 97.5% points from the standard tables
    for df, want in ((1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(want, abs=2e-3)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.95996, abs=1e-4)
    # 3 seeds of one width: sqrt(3/2) t_2 / z
    assert expansion([3]) == pytest.approx(math.sqrt(1.5) * 4.3027 / 1.95996, rel=1e-3)
    assert expansion([6, 6, 6]) < expansion([4, 4, 4]) < expansion([3, 3, 3])
    assert expansion([200] * 5) == pytest.approx(1.0, abs=0.01)
    assert expansion([3, 6, 6]) == expansion([3])                 # the fewest seeds decide


def test_beta_sq_and_exponent_are_exact_on_noiseless_biases():
    x = bias_x(WIDTHS, REF)
    w = np.array([1.0, 4.0, 16.0, 64.0])
    assert fit_beta_sq(WIDTHS, REF, 3.0 * x ** 2, w)[0] == pytest.approx(3.0, rel=1e-12)
    z = x / x.max()
    for p in (1.0, 1.5, 2.0, 3.3):
        got = fit_exponent(WIDTHS, REF, 0.7 * z[None, :] ** p, w)[0]
        assert got == pytest.approx(p, abs=0.01), p
    # no positive amplitude at any exponent: nan; negatives are kept, not dropped
    assert math.isnan(fit_exponent(WIDTHS, REF, -z[None, :] ** 2, w)[0])
    deb = np.array([[0.2, -0.05, 0.01, -0.01]])
    assert fit_beta_sq(WIDTHS, REF, deb, w)[0] == pytest.approx(float((deb[0] * w * x ** 2).sum() / (w * x ** 4).sum()))
    assert P_GRID[0] > 0 and P_GRID[-1] >= 6


def test_exponent_reason():
    assert exponent_reason([0.1, 2.0], 4) is None
    assert "no bias detected" in exponent_reason([-0.1, 2.0], 4)
    assert "fewer than 3 seeds" in exponent_reason(None, 4)
    assert "needs 3" in exponent_reason([0.1, 2.0], 2)


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_planted_bias_of_narrower_width_is_recovered(beta):
    """The case the old width-independent b² could not hold (it returned b² < 0 with its interval
    below 0, covering in 0 of 100): β² and p = 2 are recovered within their intervals."""
    sweep = Sweep(seeds=4, beta=beta, points=2000, widths=(32, 64, 128, 256, 512))
    rng = np.random.default_rng(5)
    est = SeedEnsembles(sweep.draw(rng), {w: list(range(4)) for w in sweep.widths}, 512)
    fit = est.fit_row(n_boot=400)
    truth = (beta * 32) ** 2
    lo, hi = fit["bias_beta_sq_ci"]
    assert lo <= truth <= hi and lo > 0
    assert fit["bias_beta_sq"] == pytest.approx(truth, rel=0.1)
    assert fit["bias_exponent"] == pytest.approx(2.0, abs=0.3) and fit["bias_exponent_reason"] is None
    plo, phi = fit["bias_exponent_ci"]
    assert plo <= 2.0 <= phi
    assert fit["rmse2_a"] == pytest.approx(4.0, rel=0.25)     # the variance term, bias modelled beside it


def test_no_bias_gives_no_exponent_where_the_old_slope_printed_one():
    """With no bias the old log-slope over the widths where b̂² > 0 printed a median -0.40; the
    exponent now is null in nearly every sweep (identified only when β²'s interval misses 0)."""
    ident = 0
    for rep in range(40):
        sweep = Sweep(seeds=4, beta=0.0, setting_seed=rep)
        est = SeedEnsembles(sweep.draw(np.random.default_rng(rep)), {w: list(range(4)) for w in sweep.widths}, 512)
        fit = est.fit_row(n_boot=200, seed=rep)
        ident += fit["bias_exponent"] is not None
    assert ident <= 4, ident


def test_sweep_generator_plants_its_truths():
    sweep = Sweep(seeds=3, beta=1.0, noise="hetero", points=50)
    assert float(np.mean(sweep.u ** 2)) == pytest.approx(1.0) and float(sweep.h.mean()) == pytest.approx(1.0)
    t = sweep.truths()
    assert t["variance_slope"] == pytest.approx(-1.0)
    assert t["bias_sq_debiased"][32] == pytest.approx((1.0 * 32 * (1 / 32 - 1 / 512)) ** 2)
    draws = np.stack([sweep.draw(np.random.default_rng(i))[64].numpy() for i in range(400)])  # (400, 3, 50)
    assert draws.var(axis=(0, 1), ddof=1).mean() == pytest.approx(4.0 / 64, rel=0.05)
    assert isinstance(sweep.draw(np.random.default_rng(0))[32], torch.Tensor)
