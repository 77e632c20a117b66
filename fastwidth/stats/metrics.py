"""Cross-width consistency metrics: pure functions of two signatures (or of stacks of them).

Everything here takes CPU tensors from signatures (stats/signature.py) and returns Python
floats, so a metric computed live between co-trained models and one computed against a stored
reference run are the same computation on the same numbers.

    rmse = true_logit_rmse(sig_a["true_logit"], sig_ref["true_logit"])   # the paper's metric
    c = cka(sig_a["kernel/layer0"], sig_ref["kernel/layer0"])
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _d(x) -> torch.Tensor:
    return torch.as_tensor(x).double()


def true_logit_rmse(a, b) -> float:
    """sqrt(mean_i (z_a[i, y_i] - z_b[i, y_i])^2) over probe points: Vyas et al.'s headline metric."""
    return float(torch.sqrt(torch.mean((_d(a) - _d(b)) ** 2)))


def sketch_distance(a, b) -> float:
    """RMS over points of ||R^T (z~_a - z~_b)||: estimates the RMS full (centered) logit distance.

    R has N(0, 1/k) entries, so E||R^T d||^2 = ||d||^2 (Johnson-Lindenstrauss); averaging over
    P points makes the estimate's relative error about sqrt(2 / (k P)).
    """
    return float(torch.sqrt(torch.mean(((_d(a) - _d(b)) ** 2).sum(-1))))


def top1_agreement(a, b) -> float:
    return float((torch.as_tensor(a) == torch.as_tensor(b)).double().mean())


def loss_gap(a, b) -> float:
    """Mean probe loss of a minus that of b."""
    return float(_d(a).mean() - _d(b).mean())


def center_gram(k) -> torch.Tensor:
    """H K H with H = I - 11^T/P (subtracting row and column means)."""
    k = _d(k)
    k = k - k.mean(0, keepdim=True)
    return k - k.mean(1, keepdim=True)


def kernel_alignment(k1, k2) -> float:
    """A(K1, K2) = <K1, K2>_F / (||K1||_F ||K2||_F); nan when either kernel is zero."""
    k1, k2 = _d(k1), _d(k2)
    den = torch.linalg.norm(k1) * torch.linalg.norm(k2)
    return float((k1 * k2).sum() / den) if den > 0 else math.nan


def cka(k1, k2) -> float:
    """Centered kernel alignment (Kornblith et al. 2019): the alignment of the centered kernels."""
    return kernel_alignment(center_gram(k1), center_gram(k2))


def feature_kernel(phi: torch.Tensor) -> torch.Tensor:
    """Phi = phi phi^T / N for features phi of shape (P, N): width-free scale, P x P."""
    phi = phi.float()
    return phi @ phi.T / phi.shape[-1]


def wasserstein1_hist(h1, h2, lo: float, hi: float) -> float:
    """W1 between two histograms on the same equal bins of [lo, hi]: sum |F1 - F2| * bin width.

    Bins are treated as point masses at their centers (the CDF difference is constant on each
    bin gap), which is exact for the binned distributions.
    """
    h1, h2 = _d(h1), _d(h2)
    if h1.sum() <= 0 or h2.sum() <= 0:
        return math.nan
    f1 = torch.cumsum(h1 / h1.sum(), 0)
    f2 = torch.cumsum(h2 / h2.sum(), 0)
    width = (hi - lo) / h1.numel()
    return float((f1 - f2)[:-1].abs().sum() * width)


def wasserstein1_binned(h1, h2, centers) -> float:
    """W1 between two histograms on the same bins, each bin a point mass at its center (any
    spacing, e.g. asinh bins): sum_i |F1 - F2|_i (c_{i+1} - c_i). Equals wasserstein1_hist on
    equal bins. nan when either histogram is empty."""
    h1, h2 = _d(h1), _d(h2)
    if h1.sum() <= 0 or h2.sum() <= 0:
        return math.nan
    gaps = torch.diff(torch.as_tensor(np.asarray(centers, dtype=np.float64)))
    f1 = torch.cumsum(h1 / h1.sum(), 0)
    f2 = torch.cumsum(h2 / h2.sum(), 0)
    return float(((f1 - f2)[:-1].abs() * gaps).sum())


def wasserstein1_points(h1, c1, h2, c2) -> float:
    """W1 between two histograms on different bins, each bin a point mass at its center (c1, c2
    ascending): the integral of |F1 - F2| over the merged support. Equals wasserstein1_binned when
    c1 == c2. nan when either histogram is empty."""
    h1, h2 = _d(h1), _d(h2)
    if h1.sum() <= 0 or h2.sum() <= 0:
        return math.nan
    at = torch.cat([torch.as_tensor(np.asarray(c1, dtype=np.float64)), torch.as_tensor(np.asarray(c2, dtype=np.float64))])
    mass = torch.cat([h1 / h1.sum(), -h2 / h2.sum()])
    order = torch.argsort(at, stable=True)
    diff = torch.cumsum(mass[order], 0)                                  # F1 - F2 right of each point
    return float((diff[:-1].abs() * torch.diff(at[order])).sum())


# --------------------------------------------------------------------------- ensembles

def seed_variance(stack) -> float:
    """V_N = mean over points of the unbiased variance across seeds; stack is (S, P), S >= 2."""
    s = _d(stack)
    if s.shape[0] < 2:
        return math.nan
    return float(s.var(0, correction=1).mean())


def ensemble_bias(mean_a, mean_ref) -> float:
    """||f̄_N - f̄_ref|| as an RMS over probe points (same units as true_logit_rmse)."""
    return true_logit_rmse(mean_a, mean_ref)


def fit_power_law(x, y) -> tuple[float, float]:
    """Least-squares slope and intercept of log y against log x; nan when fewer than 2 points.

    Non-positive or non-finite values are dropped (a log-log fit cannot use them).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if ok.sum() < 2 or len(set(x[ok])) < 2:
        return math.nan, math.nan
    slope, intercept = np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)
    return float(slope), float(intercept)
