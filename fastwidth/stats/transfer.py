"""The optimal learning rate across widths, its drift, and a bootstrap over seeds and evaluation examples.

    fit = transfer_fit(lrs, widths, losses, ranges={"64-1024": [...], "128-1024": [...]})
    fit["slope"], fit["ci"], fit["ranges"]["128-1024"], fit["local"]   # drift, its interval, sub-ranges

`losses` has shape (W, R, S, P): width × learning rate × seed × evaluation example, the loss of
each member on each example of one held-out evaluation shared by all members (P = 1 for a single
number per member). A member missing is nan; a member stopped for divergence is +inf on every
example (worse than any finite loss, so never an optimum).

Optimum. For width N the seed-mean loss L_N(η) = mean_s mean_p losses[N, η, s, p] is known on the
grid; η*_N is the vertex of the parabola in log η through the grid minimum and its neighbours,
clipped to their span; at the grid's edge or beside a diverged η it is the grid point ("edge").

Drift. The least-squares slope of log η*_N on log N, over all widths or a named sub-range, and the
local slopes log(η*_b / η*_a) / log(b / a) between neighbouring widths. Interval: 95% percentile
bootstrap. A replicate resamples each width's seeds with replacement (one draw per width shared by
its learning rates: a seed fixes the init) and, jointly for every member, the evaluation examples
(one multinomial draw of P examples: the evaluation set is shared, so the losses it compares are
paired). Resampling both sources of a crossed seeds × examples design counts their interaction
twice: the interval is conservative rather than narrow. With P = 1 only the seeds are resampled.
"""
from __future__ import annotations

import math

import numpy as np

from fastwidth.stats.ensemble import masked_slopes

CI_LEVEL = 0.95


def optima(lrs, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(η*, at_edge) for every row of y (..., R) over the grid `lrs` (R,), vectorized."""
    y = np.asarray(y, dtype=np.float64)
    x = np.log(np.asarray(lrs, dtype=np.float64))
    r = len(x)
    ok = np.isfinite(y)
    i = np.argmin(np.where(ok, y, np.inf), axis=-1)                  # (...)
    none = ~ok.any(-1)
    lo, hi = np.clip(i - 1, 0, r - 1), np.clip(i + 1, 0, r - 1)
    take = lambda a, j: np.take_along_axis(a, j[..., None], -1)[..., 0]  # noqa: E731
    y0, y1, y2 = take(y, lo), take(y, i), take(y, hi)
    edge = (i == 0) | (i == r - 1) | ~np.isfinite(y0) | ~np.isfinite(y2) | none
    x0, x1, x2 = x[lo], x[i], x[hi]
    with np.errstate(invalid="ignore", divide="ignore"):
        den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
        xv = x1 - 0.5 * ((x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)) / den
    grid = edge | (den == 0) | ~np.isfinite(xv)
    eta = np.where(grid, np.asarray(lrs, dtype=np.float64)[i], np.exp(np.clip(np.where(grid, x1, xv), x0, x2)))
    return np.where(none, np.nan, eta), edge


def optimum(lrs, losses) -> tuple[float, bool]:
    """(η*, at_edge) of one loss curve on the grid (see optima)."""
    eta, edge = optima(lrs, np.asarray(losses, dtype=np.float64)[None, :])
    return float(eta[0]), bool(edge[0])


def _seed_means(member: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Seed-weighted means (B, W, R) of member losses (B, W, R, S) with seed counts (B, W, S):
    nan members are left out, and an inf (diverged) member that is drawn makes the mean inf."""
    c = counts[:, :, None, :].astype(np.float64)                      # (B, W, 1, S)
    have = np.isfinite(member) | np.isinf(member)
    drawn_inf = ((c > 0) & np.isinf(member)).any(-1)
    z = np.where(np.isfinite(member), member, 0.0)
    w = c * have
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (w * z).sum(-1) / w.sum(-1)
    return np.where(drawn_inf, np.inf, mean)


def _member_losses(losses: np.ndarray, ex_weights: np.ndarray) -> np.ndarray:
    """(B, W, R, S) example-weighted mean losses; ex_weights (B, P) sum to 1 per row."""
    finite = np.isfinite(losses)
    z = np.where(finite, losses, 0.0)
    out = np.einsum("wrsp,bp->bwrs", z, ex_weights)
    inf = np.isinf(losses).any(-1)                                    # diverged: inf on every example
    missing = ~finite.any(-1) & ~inf
    return np.where(inf[None], np.inf, np.where(missing[None], np.nan, out))


def _pct(samples: np.ndarray, level: float = CI_LEVEL) -> list | None:
    ok = samples[np.isfinite(samples)]
    if ok.size < 0.9 * samples.size or ok.size == 0:
        return None
    q = (1 - level) / 2
    return [float(np.quantile(ok, q)), float(np.quantile(ok, 1 - q))]


def _local(widths, eta: np.ndarray) -> np.ndarray:
    """(..., W-1) slopes of log η* between neighbouring widths."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diff(np.log(eta), axis=-1) / np.diff(np.log(np.asarray(widths, dtype=np.float64)))


def transfer_fit(lrs, widths, losses, ranges: dict[str, list[int]] | None = None, n_boot: int = 400,
                 seed: int = 0, level: float = CI_LEVEL) -> dict:
    """Optima, drift with its interval over all widths and each named range, and local slopes."""
    lrs, widths = [float(v) for v in lrs], [int(w) for w in widths]
    L = np.asarray(losses, dtype=np.float64)
    W, R, S, P = L.shape
    if (W, R) != (len(widths), len(lrs)):
        raise ValueError(f"losses of shape {L.shape} for {len(widths)} widths and {len(lrs)} learning rates")
    ranges = {"all": widths, **(ranges or {})}
    cols = {k: np.array([w in set(v) for w in widths]) for k, v in ranges.items()}

    def fits(eta: np.ndarray) -> dict:
        return {k: masked_slopes(np.array(widths)[m], eta[:, m]) for k, m in cols.items()}

    point = _seed_means(_member_losses(L, np.full((1, P), 1.0 / P)), np.ones((1, W, S), dtype=np.int64))
    eta, edge = optima(lrs, point)                                    # (1, W)
    rng = np.random.default_rng(seed)
    seed_counts = np.stack([np.stack([np.bincount(rng.integers(0, S, S), minlength=S) for _ in range(W)])
                            for _ in range(n_boot)]) if n_boot else np.zeros((0, W, S), dtype=np.int64)
    if P > 1 and n_boot:
        ex = np.stack([np.bincount(rng.integers(0, P, P), minlength=P) for _ in range(n_boot)]) / P
    else:
        ex = np.full((n_boot, P), 1.0 / P)
    boot_eta = optima(lrs, _seed_means(_member_losses(L, ex), seed_counts))[0] if n_boot else np.zeros((0, W))
    p_fit, b_fit = fits(eta), fits(boot_eta)
    p_loc, b_loc = _local(widths, eta)[0], _local(widths, boot_eta)
    out_ranges = {k: {"widths": [w for w, m in zip(widths, cols[k]) if m], "slope": float(p_fit[k][0]),
                      "ci": _pct(b_fit[k], level) if n_boot else None} for k in ranges}
    return {"optima": dict(zip(widths, eta[0].tolist())), "edge": dict(zip(widths, edge[0].tolist())),
            "slope": out_ranges["all"]["slope"], "ci": out_ranges["all"]["ci"], "ranges": out_ranges,
            "local": [{"widths": [a, b], "slope": float(p_loc[j]),
                       "ci": _pct(b_loc[:, j], level) if n_boot else None}
                      for j, (a, b) in enumerate(zip(widths, widths[1:]))],
            "n_boot": n_boot, "seeds": S, "examples": P,
            "resampled": "seeds x examples" if P > 1 else "seeds"}


def range_label(widths: list[int]) -> str:
    return f"{min(widths)}-{max(widths)}" if widths else "–"


def fmt_ci(slope: float, ci: list | None) -> str:
    """+0.25 [+0.17, +0.31] (no interval: the slope alone)."""
    if slope is None or not math.isfinite(slope):
        return "–"
    return f"{slope:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
