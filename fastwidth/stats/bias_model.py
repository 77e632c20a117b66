"""The bias of narrower width: its size β² and its exponent, fitted on the debiased ensemble bias.

    beta_sq = fit_beta_sq(widths, ref, deb, noise)            # (B,) per bootstrap row
    p = fit_exponent(widths, ref, deb, noise)                 # (B,), nan where no positive fit
    why = exponent_reason(beta_sq_ci, n_widths)               # None when the exponent is identified

What is estimated. The distance between the width-N and reference ensembles' means is, in
expectation, b²(N) + V_N/S_N + V_ref/S_ref, so RMSE² = a(1/N + 1/N_ref) + b²(N) when V_N = a/N.
A bias of narrower width vanishes at N = N_ref and, by the infinite-width theory, its mean
correction is O(1/N): b(N) ≈ β (1/N - 1/N_ref), so

    RMSE² = a (1/N + 1/N_ref) + β² (1/N - 1/N_ref)²                     (the bias model).

A width-independent b² (the model this replaces) cannot hold such a bias: fitted to one it
returned b² < 0 with its whole interval below 0. Here the variance term is not modelled but
measured: the debiased b̂²(N) = b̂² - V̂_N/S_N - V̂_ref/S_ref (stats/ensemble.py) is unbiased for
b²(N) whatever V_N's shape, and β² is its weighted least-squares fit on x² with x = 1/N - 1/N_ref
(no intercept: b vanishes at the reference). An equivalent of the RMSE² model that does not
assume V_N = a/N exactly (on real runs V_N falls as N^-0.8 to N^-0.9, and that curvature, fitted
as a/N, leaked into the old b²). β² is in units of logit² x width²: the bias at width N is
β |1/N - 1/N_ref|.

Weights: the debiased b̂²'s sampling spread scales with the seed noise it subtracts,
σ_N ∝ V_N/S_N + V_ref/S_ref, so width N gets weight 1/σ_N² (taken from the observed seeds and kept
fixed across bootstrap rows: a fixed-weight estimator, bootstrapped as such).

β² is the p = 2 projection of the per-width biases. Where the exponent is found to be other than
2 (the demo GPT at 250 steps: p ≈ 1), β² still detects a bias (its interval excludes 0 exactly
when a weighted sum of the b̂² does), but β(1/N - 1/N_ref) is then not the bias at every width:
read the per-width b̂² beside it.

The exponent. b̂²(N) ≈ c z^p with z = x / x_max fitted by weighted least squares for p on a grid
(P_GRID), c > 0; theory says p = 2 (the O(1/N) mean correction). Negative b̂² are kept (dropping
them, as the old slope of log b̂² did, turns noise into a slope: with no bias at all it returned
-0.40 [IQR -0.75, -0.09]). The exponent is identified only when a bias is: β²'s interval lies
above 0 and at least 3 widths are compared; otherwise it is null with the reason
(exponent_reason).
"""
from __future__ import annotations

import numpy as np

P_GRID = np.round(np.arange(0.25, 8.0001, 0.05), 4)   # exponents tried; 0.05 is well under the spread seen
MIN_WIDTHS_EXPONENT = 3


def bias_x(widths, ref: int) -> np.ndarray:
    """x = 1/N - 1/N_ref per compared width (N < N_ref gives x > 0)."""
    return 1.0 / np.asarray(widths, dtype=np.float64) - 1.0 / ref


def fit_beta_sq(widths, ref: int, deb: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """β² = Σ w x² b̂² / Σ w x⁴ for each row of deb (B, W); weights (W,)."""
    deb = np.atleast_2d(np.asarray(deb, dtype=np.float64))
    if deb.shape[1] == 0:
        return np.full(deb.shape[0], np.nan)
    x2 = bias_x(widths, ref) ** 2
    w = np.asarray(weights, dtype=np.float64)
    return (deb * (w * x2)).sum(1) / float((w * x2 * x2).sum())


def fit_exponent(widths, ref: int, deb: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """p of b̂² ≈ c (x/x_max)^p (c > 0) by weighted least squares over P_GRID, per row of deb (B, W).

    For a given p the best c is Σ w z^p y / Σ w z^2p and the residual sum of squares falls by
    (Σ w z^p y)² / Σ w z^2p; the p with the largest fall and c > 0 wins, refined by a parabola
    through its grid neighbours. nan where no p gives c > 0 or fewer than 2 widths are compared.
    """
    deb = np.atleast_2d(np.asarray(deb, dtype=np.float64))
    if deb.shape[1] < 2:
        return np.full(deb.shape[0], np.nan)
    x = bias_x(widths, ref)
    z = x / x.max()
    w = np.asarray(weights, dtype=np.float64)
    zp = z[None, :] ** P_GRID[:, None]                               # (G, W)
    num = deb @ (w * zp).T                                           # (B, G): Σ w z^p y
    den = (w * zp * zp).sum(1)                                       # (G,)
    gain = np.where(num > 0, num * num / den, -np.inf)               # c > 0 only
    i = np.argmax(gain, axis=1)
    ok = np.isfinite(gain[np.arange(len(i)), i])
    p = P_GRID[i].astype(np.float64)
    inner = ok & (i > 0) & (i < len(P_GRID) - 1)
    if inner.any():                                                  # parabola through the neighbours
        r = np.arange(len(i))[inner]
        g0, g1, g2 = gain[r, i[inner] - 1], gain[r, i[inner]], gain[r, i[inner] + 1]
        fine = np.isfinite(g0) & np.isfinite(g2)
        g0, g2 = np.where(fine, g0, 0.0), np.where(fine, g2, 0.0)
        den2 = g0 - 2 * g1 + g2
        fine &= den2 < 0
        step = P_GRID[1] - P_GRID[0]
        shift = np.where(fine, 0.5 * (g0 - g2) / np.where(fine, den2, 1.0), 0.0)
        p[r] = p[r] + np.clip(shift, -0.5, 0.5) * step
    return np.where(ok, p, np.nan)


def exponent_reason(beta_sq_ci, n_widths: int, axis: str = "width") -> str | None:
    """Why the exponent is not reported (None: it is identified); axis: what is compared (width,
    or depth in a sweep across depth)."""
    if n_widths < MIN_WIDTHS_EXPONENT:
        return f"not identified: {n_widths} {axis}s compared, the exponent needs {MIN_WIDTHS_EXPONENT}"
    if beta_sq_ci is None:
        return f"not identified: no interval for bias_beta_sq (fewer than 3 seeds per {axis})"
    if not beta_sq_ci[0] > 0:
        return (f"not identified: no bias detected (bias_beta_sq interval [{beta_sq_ci[0]:.3g}, "
                f"{beta_sq_ci[1]:.3g}] reaches 0)")
    return None
