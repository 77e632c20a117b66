"""The optimal learning rate across widths (or depths), its drift, and a bootstrap over seeds and evaluation examples.

    fit = transfer_fit(lrs, widths, losses, ranges={"64-1024": [...], "128-1024": [...]})
    fit["slope"], fit["ci"], fit["ranges"]["128-1024"], fit["local"]   # drift, its interval, sub-ranges

Depth in the width's place (µTransfer across depth): `transfer_fit(lrs, depths, losses, axis="depth")`
reads the same numbers against log depth, its rows naming the depths under "depths".

`losses` has shape (W, R, S, P): width × learning rate × seed × evaluation example, the loss of
each member on each example of one held-out evaluation shared by all members (P = 1 for a single
number per member). A member missing is nan; a member stopped for divergence is +inf on every
example (worse than any finite loss, so never an optimum).

Optimum. For width N the seed-mean loss L_N(η) = mean_s mean_p losses[N, η, s, p] is known on the
grid; η*_N is the vertex of the parabola in log η through the grid minimum and its neighbours,
clipped to their span; at the grid's edge or beside a diverged η it is the grid point ("edge").
The grid may differ by width (a refined sweep: the union of the coarse grid and each width's own
refined learning rates): an η a width did not train (nan) is skipped, so the neighbours are the
nearest learning rates that width has.

Refinement (sweep.lr_refine: K). After a coarse pass, `refine_lrs` gives each width K learning
rates around its grid argmin: each coarse step beside the argmin cut into m equal parts in log η,
m the smallest with parts no wider than REFINE_RATIO = 2^½ (and with room for the points on that
side); the points nearest the argmin first, alternating sides, the vertex's side (the lower
neighbour) first. The shipped half-decade grids (steps 3 and 3.33) get m = 4: parts of ×1.32-1.35.

Resolution. A parabola through three grid points is exact for a parabola, but a loss curve in
log η is not one (a wall of divergence on the high side): its vertex misses the optimum by a part
of a step that changes as the optimum moves across a grid cell, and that part moves the drift. The
drift is `below_grid_resolution` when |slope| < (½ · s) / log(N_max / N_min), s the widest local
grid step in log η (half the bracket the parabola was read on, the widest over the widths): the
slope a shift of half a grid step of η* across the width range would make. On the toy in
tests/stats/test_lr_transfer.py (bowl + a wall receding with width, true drift +0.084) the
shipped grid reads +0.18 with a resolution of 0.28, a 2^½ grid +0.09 with 0.08.

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


REFINE_RATIO = 2 ** 0.5   # the widest refined step; on the toy a 2^½ grid's drift error is 0.01 (0.1 at half-decade)


def _take(a: np.ndarray, j: np.ndarray) -> np.ndarray:
    return np.take_along_axis(a, j[..., None], -1)[..., 0]


def _bracket(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(argmin, lo, hi) per row of y (..., R): the finite minimum and the nearest learning rates
    below and above it that the row has (not nan; inf, diverged, counts), -1 / R where none."""
    r = y.shape[-1]
    i = np.argmin(np.where(np.isfinite(y), y, np.inf), axis=-1)
    idx = np.broadcast_to(np.arange(r), y.shape)
    have = ~np.isnan(y)
    below = np.maximum.accumulate(np.where(have, idx, -1), axis=-1)            # last present at or before
    above = np.flip(np.minimum.accumulate(np.flip(np.where(have, idx, r), -1), axis=-1), -1)
    lo = np.where(i > 0, _take(below, np.maximum(i - 1, 0)), -1)
    hi = np.where(i < r - 1, _take(above, np.minimum(i + 1, r - 1)), r)
    return i, lo, hi


def optima(lrs, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(η*, at_edge) for every row of y (..., R) over the grid `lrs` (R,), vectorized; nan = not trained."""
    y = np.asarray(y, dtype=np.float64)
    x = np.log(np.asarray(lrs, dtype=np.float64))
    r = len(x)
    none = ~np.isfinite(y).any(-1)
    i, lo, hi = _bracket(y)
    out = (lo < 0) | (hi >= r)
    lo, hi = np.clip(lo, 0, r - 1), np.clip(hi, 0, r - 1)
    y0, y1, y2 = _take(y, lo), _take(y, i), _take(y, hi)
    edge = out | ~np.isfinite(y0) | ~np.isfinite(y2) | none
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


def local_steps(lrs, y: np.ndarray) -> np.ndarray:
    """Per row of y (..., R): the grid step (in log η) its optimum was read on, half the bracket
    around the argmin (one side's step at the grid's edge); nan where the row has no finite loss."""
    x = np.log(np.asarray(lrs, dtype=np.float64))
    y = np.asarray(y, dtype=np.float64)
    r = len(x)
    i, lo, hi = _bracket(y)
    below = np.where(lo >= 0, x[i] - x[np.clip(lo, 0, r - 1)], np.nan)
    above = np.where(hi < r, x[np.clip(hi, 0, r - 1)] - x[i], np.nan)
    both = np.isfinite(below) & np.isfinite(above)
    step = np.where(both, 0.5 * (below + above), np.where(np.isfinite(below), below, above))
    return np.where(np.isfinite(y).any(-1), step, np.nan)


def grid_resolution(widths, steps) -> float:
    """The smallest drift the grid resolves: (½ · widest local step) / log(N_max / N_min) (module docstring)."""
    widths, steps = np.asarray(widths, dtype=np.float64), np.asarray(steps, dtype=np.float64)
    ok = np.isfinite(steps)
    if ok.sum() < 2 or widths[ok].max() <= widths[ok].min():
        return math.nan
    return float(0.5 * steps[ok].max() / math.log(widths[ok].max() / widths[ok].min()))


def refine_lrs(lrs, y: np.ndarray, k: int, ratio: float = REFINE_RATIO) -> list[list[float]]:
    """The k learning rates to add around each row's grid argmin (module docstring: Refinement),
    for y (W, R) the seed-mean losses of W widths on the grid `lrs`; rounded to 3 significant
    digits (readable member names), sorted. A row with no finite loss gets none."""
    x = np.log(np.asarray(lrs, dtype=np.float64))
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    r = len(x)
    i, lo, hi = _bracket(y)
    out = []
    for row in range(y.shape[0]):
        if k <= 0 or not np.isfinite(y[row]).any():
            out.append([])
            continue
        c = x[i[row]]
        step = {-1: c - x[lo[row]] if lo[row] >= 0 else None, 1: x[hi[row]] - c if hi[row] < r else None}
        for d in (-1, 1):  # a side without a neighbour (the grid's edge): the other side's step
            step[d] = step[d] if step[d] is not None else (step[-d] if step[-d] is not None else math.log(ratio))
        y_side = {-1: y[row, lo[row]] if lo[row] >= 0 else -np.inf, 1: y[row, hi[row]] if hi[row] < r else -np.inf}
        first = -1 if y_side[-1] < y_side[1] else 1  # toward the lower neighbour (past the edge: outward)
        count = {first: (k + 1) // 2, -first: k // 2}
        pts = []
        for d in (-1, 1):
            parts = max(math.ceil(step[d] / math.log(ratio) - 1e-9), count[d] + 1)
            pts += [c + d * step[d] * j / parts for j in range(1, count[d] + 1)]
        out.append(sorted({float(f"{math.exp(p):.3g}") for p in pts}))
    return out


def _counts(draws: np.ndarray, n: int) -> np.ndarray:
    """Multiplicities (..., n) of each index in the last axis of `draws` (..., k): one bincount for
    all rows (the draws are those of successive per-row rng.integers calls, so results are unchanged)."""
    rows = draws.reshape(-1, draws.shape[-1])
    flat = (rows + n * np.arange(len(rows))[:, None]).ravel()
    return np.bincount(flat, minlength=n * len(rows)).reshape(*draws.shape[:-1], n)


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


def transfer_fit(lrs, sizes, losses, ranges: dict[str, list[int]] | None = None, n_boot: int = 400,
                 seed: int = 0, level: float = CI_LEVEL, axis: str = "width") -> dict:
    """Optima, drift with its interval over all sizes and each named range, and local slopes.

    `sizes` are the widths (axis="width", the default) or the depths (axis="depth": η* against depth,
    losses of shape (D, R, S, P)); the rows of "local" and "ranges" name them under f"{axis}s"."""
    lrs, sizes = [float(v) for v in lrs], [int(w) for w in sizes]
    L = np.asarray(losses, dtype=np.float64)
    W, R, S, P = L.shape
    if (W, R) != (len(sizes), len(lrs)):
        raise ValueError(f"losses of shape {L.shape} for {len(sizes)} {axis}s and {len(lrs)} learning rates")
    ranges = {"all": sizes, **(ranges or {})}
    cols = {k: np.array([w in set(v) for w in sizes]) for k, v in ranges.items()}

    def fits(eta: np.ndarray) -> dict:
        return {k: masked_slopes(np.array(sizes)[m], eta[:, m]) for k, m in cols.items()}

    point = _seed_means(_member_losses(L, np.full((1, P), 1.0 / P)), np.ones((1, W, S), dtype=np.int64))
    eta, edge = optima(lrs, point)                                    # (1, W)
    rng = np.random.default_rng(seed)
    seed_counts = _counts(rng.integers(0, S, (n_boot, W, S)), S) if n_boot else np.zeros((0, W, S), dtype=np.int64)
    if P > 1 and n_boot:
        ex = _counts(rng.integers(0, P, (n_boot, P)), P) / P
    else:
        ex = np.full((n_boot, P), 1.0 / P)
    boot_eta = optima(lrs, _seed_means(_member_losses(L, ex), seed_counts))[0] if n_boot else np.zeros((0, W))
    p_fit, b_fit = fits(eta), fits(boot_eta)
    p_loc, b_loc = _local(sizes, eta)[0], _local(sizes, boot_eta)
    steps = local_steps(lrs, point[0])
    out_ranges = {k: _range_row(np.array(sizes)[cols[k]], float(p_fit[k][0]), _pct(b_fit[k], level) if n_boot else None,
                                steps[cols[k]], axis) for k in ranges}
    # every optimum of a slope at the grid's edge (or beside a diverged η): the grid holds none of
    # them, so the slope (0 when all sit on one grid point) says nothing about the drift
    unknown = "every η* at the grid's edge (widen sweep.lrs)"
    for k, row in out_ranges.items():
        row["not_identified"] = unknown if bool(edge[0][cols[k]].all()) else None
    top = out_ranges["all"]
    return {"axis": axis, "optima": dict(zip(sizes, eta[0].tolist())), "edge": dict(zip(sizes, edge[0].tolist())),
            "not_identified": top["not_identified"],
            "slope": top["slope"], "ci": top["ci"], "resolution": top["resolution"],
            "below_grid_resolution": top["below_grid_resolution"], "ranges": out_ranges,
            "grid_step": dict(zip(sizes, np.exp(steps).tolist())),
            "local": [{f"{axis}s": [a, b], "slope": float(p_loc[j]),
                       "ci": _pct(b_loc[:, j], level) if n_boot else None,
                       "not_identified": unknown if bool(edge[0][j] and edge[0][j + 1]) else None}
                      for j, (a, b) in enumerate(zip(sizes, sizes[1:]))],
            "n_boot": n_boot, "seeds": S, "examples": P,
            "resampled": "seeds x examples" if P > 1 else "seeds"}


def _range_row(sizes: np.ndarray, slope: float, ci: list | None, steps: np.ndarray, axis: str = "width") -> dict:
    res = grid_resolution(sizes, steps)
    below = bool(abs(slope) < res) if math.isfinite(slope) and math.isfinite(res) else None
    return {f"{axis}s": [int(w) for w in sizes], "slope": slope, "ci": ci, "resolution": res, "below_grid_resolution": below}


def range_label(widths: list[int]) -> str:
    return f"{min(widths)}-{max(widths)}" if widths else "–"


def fmt_ci(slope: float, ci: list | None) -> str:
    """+0.25 [+0.17, +0.31] (no interval: the slope alone)."""
    if slope is None or not math.isfinite(slope):
        return "–"
    return f"{slope:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
