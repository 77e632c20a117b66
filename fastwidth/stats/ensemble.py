"""Seed ensembles: V_N, raw and debiased bias, the width fits and their bootstrap intervals.

    est = SeedEnsembles({w: (S_w, P) true logits}, {w: [seeds]}, ref_width)
    per_width = est.width_rows()          # seed_variance, bias, bias_sq_debiased, RMSE (+ _ci) per width
    value, ci = tail_mean_ci(per_seed_values)   # a seed mean averaged over evaluations, with its interval
    fit = est.fit_row(n_boot=1000)        # rmse/variance/bias slopes with [lo, hi] intervals

Notation: f_{N,s} is the true-class logit vector (P probe points) of the width-N model of seed s;
S_N seeds per width; f̄_N their mean; the reference width is N_ref.

- seed variance  V_N = mean_i Var_s f_{N,s,i} (unbiased over seeds, averaged over points).
- raw bias       b̂ = ||f̄_N - f̄_ref||_rms. Its square estimates b² + V_N/S_N + V_ref/S_ref, not
                 b²: each ensemble mean still carries 1/S of its width's seed variance (models of
                 one seed at two widths are independent draws, param/scaling.py).
- debiased bias² b̂² - V_N/S_N - V_ref/S_ref: unbiased for b² (E[V̂] = V), so it may be negative
                 when no bias is detectable. Same per-point normalization as V_N (mean over points).
- true-logit RMSE per width: the mean over seeds of RMSE(f_{N,s}, f_{ref,s}) (same seed where the
                 reference has it, else its first seed), as in the consistency rows. Its square
                 estimates b² + V_N + V_ref; with V_N = a/N this is the fit
                 RMSE² = a (1/N + 1/N_ref) + b², which the reference's own noise flattens near N_ref.

Every statistic is a function of the Gram matrix G = F Fᵀ / P of all members' logit vectors
(||f̄_A - f̄_B||² and V_N are means of its entries), so a bootstrap resample of seeds costs O(S²),
not O(S P). Intervals (95%): basic bootstrap over seeds (basic_ci), resampled with replacement
independently per width (the widths are independent draws); a resample in which a width keeps a
single distinct seed is redrawn (its V_N would be 0). A resample's repeated seeds are weights:
its variances and debiasing use the weighted unbiased forms (_variance, _stats), so a replicate
does not shrink with the number of repeats (plain resampling makes every replicate's V_N depend
on how many seeds repeat, a variation shared by all points that widened intervals 2-3x on
synthetic data). The pivot T* - T_pop uses each statistic's bootstrap-world value (_population).
The raw bias's interval is one for its own target sqrt(b² + V_N/S_N + V_ref/S_ref), which depends
on S: it is not an interval for b; bias_sq_debiased's is. Intervals need
>= MIN_SEEDS_CI seeds at every width (with 2 seeds every valid resample is the original pair);
otherwise they are None. Measured on synthetic sweeps (S = 6, tests/stats/test_ensemble.py): the
V_N slope's interval covers at about its level (91%, width matching the sampling spread); the
debiased b²'s is conservative near b² = 0 (about 1.8x the sampling spread: the replicates add
the observed noise's cross term 2<f̄_N - f̄_ref, noise*>, which the truth b = 0 does not have).
"""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch

from fastwidth.stats.bias_model import bias_x, exponent_reason, fit_beta_sq, fit_exponent

MIN_SEEDS_CI = 3
# One width's V_N over 3 seeds: the bootstrap has 4 distinct resamples (3 pairs and the whole),
# and even expanded on the log scale its interval covered 0.84-0.93 (docs/calibration.md); from
# 4 seeds it covers 0.93-1.0. So no per-width V_N interval is printed below 4 seeds (the slope
# of V_N across widths, which pools every width, keeps its interval from 3).
MIN_SEEDS_VARIANCE_CI = 4
MIN_SEEDS_LINF_CI = 3     # L∞'s jackknife: every leave-one-out curve needs >= 2 points
CI_LEVEL = 0.95
MAX_SUBSETS = 32   # ensembles of E members: all C(S, E) subsets up to this many, else a fixed sample


# --------------------------------------------------------------------------- fits, vectorized

def masked_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slopes of log y on log x for each row of y (B, W); non-positive y dropped.

    A row keeps nan unless at least two distinct x survive. Equals stats.metrics.fit_power_law
    row by row.
    """
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    if y.shape[1] < 2:
        return np.full(y.shape[0], np.nan)
    lx = np.log(np.asarray(x, dtype=np.float64))[None, :]
    ok = np.isfinite(y) & (y > 0)
    ly = np.where(ok, np.log(np.where(ok, y, 1.0)), 0.0)
    n = ok.sum(1)
    mx = (ok * lx).sum(1) / np.maximum(n, 1)
    my = ly.sum(1) / np.maximum(n, 1)
    dx = np.where(ok, lx - mx[:, None], 0.0)
    sxx = (dx * dx).sum(1)
    sxy = (dx * (ly - my[:, None])).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n >= 2) & (sxx > 1e-12), sxy / sxx, np.nan)


def linear_fits(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slope and intercept of y = a x + c for each row of y (B, W) (ordinary least squares)."""
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2 or y.shape[1] != len(x) or np.ptp(x) <= 0:
        nan = np.full(y.shape[0], np.nan)
        return nan, nan
    dx = x - x.mean()
    sxx = (dx * dx).sum()
    a = (y - y.mean(1, keepdims=True)) @ dx / sxx
    return a, y.mean(1) - a * x.mean()


@functools.lru_cache(maxsize=None)
def t_quantile(q: float, df: float) -> float:
    """Student-t quantile (0.5 < q < 1) by bisection on its CDF, integrated by Simpson's rule: the
    project does not depend on scipy, and the intervals need it only for a few degrees of freedom."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 2001)
        f = c * (1 + t * t / df) ** (-(df + 1) / 2)
        return 0.5 + (t[1] - t[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def expansion(seeds: list[int], level: float = CI_LEVEL) -> float:
    """Factor that widens a bootstrap interval over few seeds to its nominal coverage.

    The bootstrap spread of a mean of n seeds is sqrt((n-1)/n) s/sqrt(n), and the exact interval of
    a mean of normal draws uses t_{n-1} rather than z: the "expanded" interval (Hesterberg 2015,
    "What teachers should know about the bootstrap") scales the bootstrap deviations by
    sqrt(n/(n-1)) t_{n-1}/z, n the fewest seeds among the widths a statistic uses. Pooling the
    degrees of freedom of several widths (sum of n_w - 1) was tried and fell short on heavy-tailed
    seed noise (slopes 0.87 at 3 seeds); n - 1 is conservative for statistics of many widths (the
    slopes cover 0.97-1.0) and holds 0.9 everywhere the calibration looked. Uncorrected, 3 seeds
    gave the V_N slope 0.78-0.88 coverage and the per-width intervals 0.48-0.74
    (docs/calibration.md has the before and after tables).
    """
    n = min(seeds)
    if n < 2:
        return math.nan
    df = float(n - 1)
    z = t_quantile(1 - (1 - level) / 2, 1e7)
    return math.sqrt(n / (n - 1)) * t_quantile(1 - (1 - level) / 2, df) / z


def basic_ci(observed, samples, truth, level: float = CI_LEVEL, min_finite: float = 0.9,
             expand: float = 1.0) -> list | None:
    """Basic (pivotal) bootstrap interval [T - k q_hi(T* - T_pop), T - k q_lo(T* - T_pop)].

    k = `expand` (see expansion(); 1 is the plain basic interval).

    T_pop is the statistic's target in the bootstrap world (the empirical distribution resampled).
    Unlike the percentile interval this stays centered where an estimator's bootstrap replicates
    are not: the debiased b̂²'s replicates center on the raw b̂² (its bootstrap-world truth), not on
    itself. None when T is not finite or under `min_finite` of the replicates are.
    """
    t, t_pop = float(np.ravel(observed)[0]), float(np.ravel(truth)[0])
    err = np.asarray(samples, dtype=np.float64) - t_pop
    ok = err[np.isfinite(err)]
    if not (math.isfinite(t) and math.isfinite(t_pop)) or err.size == 0 or ok.size < min_finite * err.size:
        return None
    q = (1 - level) / 2
    return [t - expand * float(np.quantile(ok, 1 - q)), t - expand * float(np.quantile(ok, q))]


def log_ci(observed, samples, truth, level: float = CI_LEVEL, expand: float = 1.0) -> list | None:
    """basic_ci on the log scale, mapped back: for a positive, right-skewed statistic (a variance
    over few seeds) the basic interval on the raw scale reflects the skew the wrong way (it covered
    V_N 0.82-0.87 of the time at 3 seeds with seed noise of low rank); on the log scale the
    bootstrap deviations are nearly symmetric. None where a value is not positive."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ci = basic_ci(np.log(np.asarray(observed, dtype=np.float64)), np.log(np.asarray(samples, dtype=np.float64)),
                      np.log(np.asarray(truth, dtype=np.float64)), level, expand=expand)
    return None if ci is None else [math.exp(ci[0]), math.exp(ci[1])]


def covering(ci: list | None, value: float) -> list | None:
    """`ci` extended to contain `value` where it does not (summary.json's contract: an interval holds
    its point). A basic interval misses its point only when the replicates' 2.5-97.5% range misses
    the bootstrap-world value, which needs a strongly skewed statistic with 3-4 seeds; then the
    interval's far end is kept and the near end moved to the point, never narrowed."""
    if ci is None or not math.isfinite(value):
        return ci
    return [min(ci[0], value), max(ci[1], value)]


def tail_mean_ci(values, n_boot: int = 1000, seed: int = 0, level: float = CI_LEVEL) -> tuple[float, list | None]:
    """(value, [lo, hi]) of the mean over columns of the per-column seed means of `values` (S, T).

    Rows are seeds, columns the evaluations averaged (the report's last 25% of tokens); nan marks a
    seed without that evaluation. The value is then exactly the report's late mean of the
    seed-mean series. Interval: basic bootstrap over seeds (rows resampled with replacement, as
    weights), covering the value; None with fewer than MIN_SEEDS_CI seeds.
    """
    m = np.atleast_2d(np.asarray(values, dtype=np.float64))
    have = np.isfinite(m)
    z = np.where(have, m, 0.0)

    def stat(weights: np.ndarray) -> np.ndarray:                      # weights (B, S) -> (B,)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_t = (weights @ z) / (weights @ have)                  # (B, T) seed means per column
        return np.nanmean(np.where(np.isfinite(per_t), per_t, np.nan), axis=1)

    value = float(stat(np.ones((1, m.shape[0])))[0])
    if m.shape[0] < MIN_SEEDS_CI or not n_boot or not math.isfinite(value):
        return value, None
    pos = np.random.default_rng(seed).integers(0, m.shape[0], (n_boot, m.shape[0]))
    weights = (pos[:, :, None] == np.arange(m.shape[0])).sum(1).astype(np.float64)   # (B, S) multiplicities
    return value, covering(basic_ci(value, stat(weights), value, level, expand=expansion([m.shape[0]], level)), value)


# --------------------------------------------------------------------------- the estimator

def _f(x) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else math.nan


class SeedEnsembles:
    """Per-width ensemble statistics of one eval step and their bootstrap over seeds."""

    def __init__(self, true: dict[int, torch.Tensor], seeds: dict[int, list[int]], ref_width: int):
        self.widths = sorted(true)
        self.ref = ref_width
        if ref_width not in true:
            raise ValueError(f"reference width {ref_width} has no members among {self.widths}")
        blocks = [torch.as_tensor(true[w]).double() for w in self.widths]
        F = torch.cat(blocks).numpy()                                    # (M, P)
        self.G = F @ F.T / F.shape[1]                                    # (M, M)
        start = np.cumsum([0] + [b.shape[0] for b in blocks])
        self.index = {w: np.arange(start[i], start[i + 1]) for i, w in enumerate(self.widths)}
        ref_seeds = list(seeds[ref_width])
        # the reference member each width's j-th member is compared with (same seed, else the first)
        self.pair = {w: np.array([ref_seeds.index(s) if s in ref_seeds else 0 for s in seeds[w]])
                     for w in self.widths}

    # ---- statistics for index sets (B, S) of members (rows of G), vectorized over B

    def _block_mean(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.G[a[:, :, None], b[:, None, :]].mean((1, 2))

    @staticmethod
    def _dup(a: np.ndarray) -> np.ndarray:
        """Σ_j w_j² of the resample's member weights w_j = multiplicity / S: 1/S without repeats."""
        return (a[:, :, None] == a[:, None, :]).mean((1, 2))

    def _variance(self, a: np.ndarray) -> np.ndarray:
        """Unbiased seed variance of weighted members: Σ w (f - f̄_w)² / (1 - Σ w²), mean over points.

        With distinct seeds this is the usual S/(S-1) estimator; for a bootstrap resample it is
        conditionally unbiased for the observed V_N whatever the repeats (the distinct seeds are a
        draw without replacement), so the replicates do not vary with how many seeds repeat.
        """
        if a.shape[1] < 2:
            return np.full(a.shape[0], np.nan)
        return (self.G[a, a].mean(1) - self._block_mean(a, a)) / (1 - self._dup(a))

    def _stats(self, idx: dict[int, np.ndarray]) -> dict[str, dict[int, np.ndarray]]:
        """{stat: {width: (B,)}} for member index sets idx[w] of shape (B, S_w).

        The debiasing subtracts Var(f̄) = V Σ w² (V/S without repeats), and the raw bias is
        rebuilt as sqrt(b̂²_debiased + V_N/S_N + V_ref/S_ref): on the observed seeds both are the
        plain formulas, on a resample their expectations are the observed values.
        """
        r = idx[self.ref]
        var = {w: self._variance(a) for w, a in idx.items()}
        rr = self._block_mean(r, r)
        out = {"seed_variance": var, "bias": {}, "bias_sq_debiased": {}, "bias_noise": {}, "rmse": {}, "rmse_sq": {}}
        for w, a in idx.items():
            if w == self.ref:
                continue
            b2 = self._block_mean(a, a) - 2 * self._block_mean(a, r) + rr
            noise = var[w] * self._dup(a) + var[self.ref] * self._dup(r)
            deb = b2 - noise
            out["bias_sq_debiased"][w] = deb
            out["bias_noise"][w] = noise
            out["bias"][w] = np.sqrt(np.maximum(deb + var[w] / a.shape[1] + var[self.ref] / r.shape[1], 0.0))
            partner = r[:, self.pair[w] % r.shape[1]]                    # (B, S_w)
            d2 = np.maximum(self.G[a, a] - 2 * self.G[a, partner] + self.G[partner, partner], 0.0)
            out["rmse"][w] = np.sqrt(d2).mean(1)
            out["rmse_sq"][w] = d2.mean(1)
        return out

    def _point(self) -> dict[str, dict[int, np.ndarray]]:
        return self._stats({w: i[None, :] for w, i in self.index.items()})

    def _population(self, point: dict) -> dict[str, dict[int, np.ndarray]]:
        """What each statistic's replicates center on in the bootstrap world: the observed V_N and
        biases of `point` (see _stats), and for RMSEs the mean over every (member, reference
        member) pair, since a resample pairs members at random."""
        out = dict(point)
        r = self.index[self.ref]
        out["rmse"], out["rmse_sq"] = {}, {}
        for w, a in self.index.items():
            if w == self.ref:
                continue
            d2 = np.maximum(np.diag(self.G)[a][:, None] - 2 * self.G[np.ix_(a, r)] + np.diag(self.G)[r][None, :], 0.0)
            out["rmse"][w] = np.array([np.sqrt(d2).mean()])
            out["rmse_sq"][w] = np.array([d2.mean()])
        return out

    def _resamples(self, n_boot: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
        idx = {}
        for w, members in self.index.items():
            s = len(members)
            pos = rng.integers(0, s, (n_boot, s))
            bad = (pos == pos[:, :1]).all(1)
            while bad.any():                                             # a single distinct seed: redraw
                pos[bad] = rng.integers(0, s, (int(bad.sum()), s))
                bad = (pos == pos[:, :1]).all(1)
            idx[w] = members[pos]
        return idx

    def can_bootstrap(self) -> bool:
        return min(len(i) for i in self.index.values()) >= MIN_SEEDS_CI

    def _bootstrap(self, n_boot: int, seed: int, point: dict, weights: np.ndarray | None = None):
        """(observed, bootstrap (B,), bootstrap-world truth) per statistic of `point` (this step's
        _point()), or of the width fits with `weights`; None without a bootstrap."""
        if not n_boot or not self.can_bootstrap():
            return None
        boot = self._stats(self._resamples(n_boot, np.random.default_rng(seed)))
        population = self._population(point)
        if weights is not None:
            return self._fits(point, weights), self._fits(boot, weights), self._fits(population, weights)
        flat = lambda d: {f"{k}/{w}": v for k, by_w in d.items() for w, v in by_w.items()}  # noqa: E731
        return flat(point), flat(boot), flat(population)

    def replicates(self, key: str, n_boot: int = 1000, seed: int = 0) -> dict[int, tuple[float, np.ndarray, float]]:
        """{width: (observed, bootstrap replicates (B,), bootstrap-world truth)} of statistic `key`
        (e.g. "bias_sq_debiased"), the draws width_rows' intervals come from; {} without a
        bootstrap. Two runs' replicates, drawn independently, give a ratio's interval."""
        p = self._point()
        boot = self._bootstrap(n_boot, seed, p)
        if boot is None:
            return {}
        return {w: (float(boot[0][f"{key}/{w}"][0]), boot[1][f"{key}/{w}"], float(boot[2][f"{key}/{w}"][0]))
                for w in p[key]}

    # ---- rows

    def width_rows(self, n_boot: int = 1000, seed: int = 0) -> dict[int, dict]:
        """{width: {n_seeds, seed_variance(_ci), seed_std, bias, bias_sq_debiased(_ci), true_logit_rmse(_ci)}}.

        true_logit_rmse is this step's mean same-seed RMSE to the reference (the fit's points); the
        reference width has no bias or RMSE entries. Every `_ci` is None without a bootstrap.
        """
        p = self._point()
        boot = self._bootstrap(n_boot, seed, p)
        n_ref = len(self.index[self.ref])

        def ci(key: str, w: int, seeds: list[int]) -> list | None:
            return basic_ci(*(d[f"{key}/{w}"] for d in boot), expand=expansion(seeds)) if boot else None

        rows = {}
        for w in self.widths:
            v, n = float(p["seed_variance"][w][0]), len(self.index[w])
            row = {"n_seeds": n, "bias": 0.0 if w == self.ref else float(p["bias"][w][0])}
            if math.isfinite(v):
                v_ci = log_ci(*(d[f"seed_variance/{w}"] for d in boot), expand=expansion([n])) \
                    if boot and n >= MIN_SEEDS_VARIANCE_CI else None
                row.update(seed_variance=v, seed_std=math.sqrt(max(v, 0.0)), seed_variance_ci=covering(v_ci, v))
            if w != self.ref:
                row["bias_sq_debiased"] = float(p["bias_sq_debiased"][w][0])
                row["bias_sq_debiased_ci"] = ci("bias_sq_debiased", w, [n, n_ref])
                rmse = float(p["rmse"][w][0])
                row["true_logit_rmse"] = rmse
                row["true_logit_rmse_ci"] = covering(ci("rmse", w, [n, n_ref]), rmse)
            rows[w] = row
        return rows

    def mean_rmse(self, n_boot: int = 1000, seed: int = 0) -> dict[int, tuple[float, list | None]]:
        """{width: (||f̄_N - f̄_ref||_rms, its 95% interval)} for every width but the reference: the
        RMSE between the two seed-ensemble means (the raw bias). Its target is
        sqrt(b² + V_N/S_N + V_ref/S_ref), so it falls with more seeds; the interval (basic bootstrap
        over seeds on the log scale, log_ci: the value is positive and right-skewed; None without a
        bootstrap) is for that target. Needs >= 2 seeds per width (V_N)."""
        p = self._point()
        boot = self._bootstrap(n_boot, seed, p)
        n_ref = len(self.index[self.ref])
        out = {}
        for w in self.widths:
            if w == self.ref:
                continue
            v = float(p["bias"][w][0])
            ci = log_ci(*(d[f"bias/{w}"] for d in boot), expand=expansion([len(self.index[w]), n_ref])) if boot else None
            out[w] = (v, covering(ci, v))
        return out

    def fit_row(self, n_boot: int = 1000, seed: int = 0, axis: str = "width") -> dict:
        """The width fits at this step, each with its `<name>_ci` (None without a bootstrap).

        rmse_slope, variance_slope, bias_slope (raw bias): slopes of log value on log N.
        rmse2_a: a of RMSE² = a(1/N + 1/N_ref) + β²(1/N - 1/N_ref)² (least squares, both terms).
        bias_beta_sq, bias_exponent: the bias model (stats/bias_model.py); the exponent and its
        interval are None unless a bias is identified, with `bias_exponent_reason` saying why.
        Intervals: basic bootstrap over seeds, expanded for the fewest seeds of any width (expansion).
        axis "depth": the keys are depths (stats/across_depth.py): rmse_depths, and the reason says so.
        """
        p = self._point()
        weights = self._bias_weights(p)
        boot = self._bootstrap(n_boot, seed + 1, p, weights)
        fits = boot[0] if boot else self._fits(p, weights)
        out = {k: _f(v[0]) for k, v in fits.items()}
        k = expansion([len(i) for i in self.index.values()])
        for name in fits:
            out[f"{name}_ci"] = basic_ci(fits[name], boot[1][name], boot[2][name], expand=k) if boot else None
        compared = [w for w in self.widths if w != self.ref]
        why = exponent_reason(out["bias_beta_sq_ci"], len(compared), axis)
        if why is not None:
            out.update(bias_exponent=None, bias_exponent_ci=None)
        out.update(bias_exponent_reason=why, n_boot=n_boot if boot else 0, ci_level=CI_LEVEL, ci_expansion=k if boot else None,
                   **{f"rmse_{axis}s": compared})
        return out

    def _bias_weights(self, p: dict) -> np.ndarray:
        """1/σ_N² per compared width, σ_N = V_N/S_N + V_ref/S_ref of the observed seeds (bias_model)."""
        ws = sorted(p["bias_noise"])
        noise = np.array([float(p["bias_noise"][w][0]) for w in ws])
        good = np.isfinite(noise) & (noise > 0)
        fill = noise[good].min() if good.any() else 1.0
        return 1.0 / np.where(good, noise, fill) ** 2

    def _fits(self, s: dict[str, dict[int, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        n_boot = len(next(iter(s["seed_variance"].values())))

        def stack(d):
            ws = sorted(d)
            return ws, np.stack([d[w] for w in ws], 1) if ws else np.full((n_boot, 0), np.nan)  # (B, W)

        ws, rmse = stack(s["rmse"])
        out = {"rmse_slope": masked_slopes(ws, rmse)}
        vw, var = stack(s["seed_variance"])
        out["variance_slope"] = masked_slopes(vw, var)
        out["bias_slope"] = masked_slopes(ws, stack(s["bias"])[1])
        deb = stack(s["bias_sq_debiased"])[1]
        out["bias_beta_sq"] = fit_beta_sq(ws, self.ref, deb, weights)
        out["bias_exponent"] = fit_exponent(ws, self.ref, deb, weights)
        x1, x2 = 1.0 / np.asarray(ws, dtype=np.float64) + 1.0 / self.ref, bias_x(ws, self.ref) ** 2
        out["rmse2_a"] = _two_term_fit(x1, x2, stack(s["rmse_sq"])[1])
        return out


# --------------------------------------------------------------------------- three outputs

# V_N and b² of three per-point outputs (issue 31): the raw true logit z_y (the unsuffixed fields),
# the centered true logit z_y - mean_c z_c ("_centered") and log p_y ("_logp"). The last two are
# free of the softmax-invariant shift c·1 of every logit (Adam's readout updates can move all
# logits together); where only the raw V_N flattens in width, the flattening is that shift.
OUTPUT_SUFFIXES = ("", "_centered", "_logp")
OUTPUT_WIDTH_KEYS = ("seed_variance", "seed_variance_ci", "bias_sq_debiased", "bias_sq_debiased_ci")
OUTPUT_FIT_KEYS = ("variance_slope",)


def output_values(sig: dict, suffix: str) -> torch.Tensor | None:
    """The per-point values of one output (OUTPUT_SUFFIXES) from a signature; None where it holds
    no way to form them. log p_y is -loss. A signature written before centered_true_logit existed
    forms it from its stored logits (classifiers); an LM's then has none."""
    if suffix == "":
        return sig.get("true_logit")
    if suffix == "_logp":
        return None if "loss" not in sig else -sig["loss"].float()
    if "centered_true_logit" in sig:
        return sig["centered_true_logit"]
    if "logits" in sig and "true_logit" in sig:
        return sig["true_logit"].float() - sig["logits"].float().mean(-1)
    return None


def output_rows(sigs: dict[int, list[dict]], seeds: dict[int, list[int]], ref_width: int,
                n_boot: int = 1000, seed: int = 0) -> tuple[dict[int, dict], dict]:
    """({width: {seed_variance_<s>, ..._ci, bias_sq_debiased_<s>, ..._ci}}, {variance_slope_<s>, ..._ci})
    for the suffixed outputs s of OUTPUT_SUFFIXES whose values every signature of `sigs` (a width's
    seeds' signatures, in `seeds` order) holds: the estimator of the unsuffixed fields
    (SeedEnsembles), applied to that output."""
    rows: dict[int, dict] = {w: {} for w in sigs}
    fit: dict = {}
    for suffix in OUTPUT_SUFFIXES[1:]:
        vals = {w: [output_values(s, suffix) for s in ss] for w, ss in sigs.items()}
        if any(v is None for vs in vals.values() for v in vs):
            continue
        est = SeedEnsembles({w: torch.stack(vs) for w, vs in vals.items()}, seeds, ref_width)
        for w, r in est.width_rows(n_boot, seed).items():
            rows[w].update({_suffixed(k, suffix): r[k] for k in OUTPUT_WIDTH_KEYS if k in r})
        f = est.fit_row(n_boot, seed)
        fit.update({_suffixed(k, suffix): f[k] for base in OUTPUT_FIT_KEYS for k in (base, f"{base}_ci")})
    return rows, fit


def _suffixed(key: str, suffix: str) -> str:
    """seed_variance_ci, "_centered" -> seed_variance_centered_ci (the interval keeps its _ci last)."""
    return f"{key[:-3]}{suffix}_ci" if key.endswith("_ci") else key + suffix


def late_variance_slope(steps: list[dict[int, torch.Tensor]], seeds: dict[int, list[int]], ref_width: int,
                        n_boot: int = 1000, seed: int = 0) -> tuple[float, list | None, dict[int, float]]:
    """(slope, interval, {width: V_N}) of the late mean: V_N per width averaged over the evaluations
    `steps` (each {width: (S_w, P) values}, the same seeds at every step), its log-log slope on
    width. Interval: basic bootstrap over seeds with one resample of seeds shared by every step
    (a seed is one draw of the whole trajectory), expanded as fit_row's; None without a bootstrap."""
    ests = [SeedEnsembles(t, seeds, ref_width) for t in steps]
    widths = ests[0].widths

    def mean_var(stats: list[dict]) -> np.ndarray:                     # (B, W)
        return np.mean([np.stack([s["seed_variance"][w] for w in widths], 1) for s in stats], 0)

    points = [e._point() for e in ests]
    point = mean_var(points)
    slope = _f(masked_slopes(widths, point)[0])
    values = {w: float(point[0, i]) for i, w in enumerate(widths)}
    if not n_boot or not ests[0].can_bootstrap():
        return slope, None, values
    idx = ests[0]._resamples(n_boot, np.random.default_rng(seed + 1))  # member positions: equal at every step
    boot = masked_slopes(widths, mean_var([e._stats(idx) for e in ests]))
    pop = masked_slopes(widths, mean_var([e._population(p) for e, p in zip(ests, points)]))
    ci = basic_ci(slope, boot, pop, expand=expansion([len(i) for i in ests[0].index.values()]))
    return slope, ci, values


def _two_term_fit(x1: np.ndarray, x2: np.ndarray, y: np.ndarray) -> np.ndarray:
    """a of y = a x1 + c x2 (no intercept) by least squares, for each row of y (B, W)."""
    if len(x1) < 2:
        return np.full(y.shape[0], np.nan)
    X = np.stack([x1, x2], 1)                                            # (W, 2)
    coef, *_ = np.linalg.lstsq(X, y.T, rcond=None)                       # (2, B)
    return coef[0]


# --------------------------------------------------------------------------- ensembles of E members

def member_subsets(n_members: int, e: int, limit: int = MAX_SUBSETS, seed: int = 0) -> list[tuple[int, ...]]:
    """All size-e subsets of range(n_members), or `limit` of them drawn without repeats (fixed seed)."""
    n_all = math.comb(n_members, e)
    if n_all <= limit:
        return list(itertools.combinations(range(n_members), e))
    rng = np.random.default_rng(seed + 1000 * e)
    picked: set[tuple[int, ...]] = set()
    while len(picked) < limit:
        picked.add(tuple(sorted(rng.choice(n_members, e, replace=False).tolist())))
    return sorted(picked)


class EnsembleCurve:
    """Loss and accuracy of the averaged-logit ensemble of E = 1..S members, streamed over points.

    For each E the value is the mean over size-E subsets of members (all of them, or MAX_SUBSETS
    drawn with a fixed seed), so L(1) is the mean single-model loss and L(S) the full ensemble's.
    L∞ (the fit L(E) = L∞ + c/E) gets a jackknife interval over members: leaving member i out, the
    curve over the other S - 1 (the same subsets, those without i) gives L∞_(-i); the interval is
    L∞ ± t_(S-1) · sqrt((S-1)/S Σ (L∞_(-i) - mean)²), from MIN_SEEDS_LINF_CI members (with fewer
    the leave-one-out curves have fewer than 2 points). Its coverage: docs/calibration.md.
    """

    def __init__(self, n_members: int):
        self.n = n_members
        self.subsets = {e: member_subsets(n_members, e) for e in range(1, n_members + 1)}
        self.sub_loss = {(e, sub): 0.0 for e, subs in self.subsets.items() for sub in subs}
        self.correct = {e: 0.0 for e in self.subsets}
        self.points = 0

    @torch.no_grad()
    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """logits (S, M, C) of the S members on M points, targets y (M,)."""
        logits, y = logits.double(), y.reshape(-1)
        for e, subsets in self.subsets.items():
            for sub in subsets:
                z = logits[list(sub)].mean(0)                            # (M, C)
                self.sub_loss[(e, sub)] += float(torch.nn.functional.cross_entropy(z, y, reduction="sum"))
                self.correct[e] += float((z.argmax(-1) == y).sum()) / len(subsets)
        self.points += y.numel()

    def _curve(self, leave_out: int | None = None) -> list[float]:
        n = max(self.points, 1)
        out = []
        for e, subsets in sorted(self.subsets.items()):
            kept = [sub for sub in subsets if leave_out not in sub]
            if kept:
                out.append(sum(self.sub_loss[(e, sub)] for sub in kept) / len(kept) / n)
        return out

    def result(self) -> dict:
        """{ensemble_loss: [L(1..S)], ensemble_acc: [...], ensemble_loss_inf, ensemble_loss_inf_ci,
        ensemble_loss_c}."""
        n = max(self.points, 1)
        loss = self._curve()
        acc = [self.correct[e] / n for e in sorted(self.correct)]
        inf, c = fit_inverse_e(loss)
        ci = None
        if self.n >= MIN_SEEDS_LINF_CI and math.isfinite(inf):
            loo = np.array([fit_inverse_e(self._curve(i))[0] for i in range(self.n)])
            se = math.sqrt((self.n - 1) / self.n * float(((loo - loo.mean()) ** 2).sum()))
            half = t_quantile(1 - (1 - CI_LEVEL) / 2, self.n - 1) * se
            ci = [inf - half, inf + half] if math.isfinite(half) else None
        return {"ensemble_loss": loss, "ensemble_acc": acc, "ensemble_loss_inf": inf, "ensemble_loss_inf_ci": ci,
                "ensemble_loss_c": c}


def fit_inverse_e(loss: list[float]) -> tuple[float, float]:
    """L(E) = L∞ + c/E by least squares over E = 1..len(loss); nan with fewer than 2 points."""
    if len(loss) < 2:
        return math.nan, math.nan
    e = np.arange(1, len(loss) + 1, dtype=np.float64)
    c, inf = linear_fits(1.0 / e, np.asarray(loss)[None, :])
    return _f(inf[0]), _f(c[0])


@torch.no_grad()
def lm_ensemble_curve(models: list[torch.nn.Module], spec, device) -> dict:
    """EnsembleCurve of `models` (one width's seeds) over every probe token, computed in the loop.

    Language models do not store full logits in their signatures (a vocabulary per token), so the
    averaged-logit ensembles are formed here, chunk by chunk: S forwards per chunk, eval_batch/S
    sequences a chunk so the S logit blocks together stay at one eval batch's size.
    """
    curve = EnsembleCurve(len(models))
    chunk = max(1, spec.eval_batch // len(models))
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        for s in range(0, spec.n_examples, chunk):
            x = spec.x[s:s + chunk].to(device)
            z = torch.stack([_flat_logits(m, x) for m in models])     # (S, b*T, V)
            curve.add(z, spec.y[s:s + chunk].reshape(-1).to(device))
    finally:
        for m, w in zip(models, was):
            m.train(w)
    return curve.result()


def _flat_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    z = model(x).float()
    return z.reshape(-1, z.shape[-1])                                    # (b*T, V)
