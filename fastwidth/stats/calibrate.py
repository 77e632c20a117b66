"""Simulation-based calibration of every interval the report prints: plant a truth, run the very
code the report uses on many synthetic sweeps, count how often the 95% interval holds the truth.

    python -m fastwidth.stats.calibrate [--quick] --json FILE [--md FILE]

writes {statistic: [{seeds, setting, truth, coverage, repeats, ...}, ...]} (DESIGN §5) and, with
--md, the table kept in docs/calibration.md.

The sweeps. A setting fixes the probe points (P of them: a reference logit μ_i, a bias direction
u_i normalized to mean(u²) = 1, and, for `hetero`, a per-point variance profile h_i of mean 1);
each repeat redraws only the seed noise, as the bootstrap (which resamples seeds) assumes. The
true logit of the width-N model of seed s on point i is

    f_{N,s,i} = μ_i + β N0 (1/N - 1/N_ref) u_i + sqrt(a h_i / N) ε_{N,s,i}

with N0 the narrowest width and ε of unit variance: Gaussian and independent across points
(`gauss`, `hetero`), Student-t with 5 degrees of freedom (`t5`), or `lowrank`: a seed's deviation
spans LOWRANK directions over the points (a network's seed deviation is a function, correlated
across points, which leaves far fewer effective degrees of freedom than P). So V_N = a/N exactly, the bias of width N is b²(N) = β² N0² (1/N - 1/N_ref)²,
and the bias model's β² (stats/bias_model.py, in units of 1/N) is β² N0². Truths that depend on
the noise's distribution (the mean same-seed RMSE, the raw ensemble bias) are Monte-Carlo
expectations over TRUTH_DRAWS draws of the same generator, computed once per setting.

The learning-rate drift: member losses L_N(η) + seed offset + example effect + member x example
noise on a log-η grid, with the optimum η*_N = η0 (N/N0)^d (parabolic bowl) or a fixed bowl with a
high-LR wall that recedes with width (the drift then is whatever the population curves' minima
give, found numerically). stats/transfer.py's transfer_fit is run as the report runs it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fastwidth.stats.ensemble import EnsembleCurve, SeedEnsembles, tail_mean_ci
from fastwidth.stats.transfer import refine_lrs, transfer_fit

TRUTH_DRAWS = 20000
LOWRANK = 5
WIDTHS = (32, 64, 128, 256, 512)


# --------------------------------------------------------------------------- synthetic sweeps

@dataclass
class Sweep:
    """One setting of the synthetic width sweep (module docstring)."""
    seeds: int
    beta: float = 0.0
    noise: str = "gauss"          # gauss | hetero | t5 | lowrank
    a: float = 4.0
    points: int = 100
    widths: tuple = WIDTHS
    setting_seed: int = 0
    mu: np.ndarray = field(init=False, repr=False)
    u: np.ndarray = field(init=False, repr=False)
    h: np.ndarray = field(init=False, repr=False)
    g: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        rng = np.random.default_rng(10_000 + self.setting_seed)
        self.mu = rng.standard_normal(self.points)
        u = rng.standard_normal(self.points)
        self.u = u / math.sqrt(float(np.mean(u * u)))
        h = np.exp(rng.standard_normal(self.points)) if self.noise == "hetero" else np.ones(self.points)
        self.h = h / h.mean()
        # lowrank: a seed moves the function along LOWRANK directions shared by every point, as a
        # network's seed deviation is a smooth function, not independent noise per point
        g = rng.standard_normal((self.points, LOWRANK))
        self.g = g / np.sqrt((g * g).sum(1, keepdims=True))

    @property
    def name(self) -> str:
        return f"beta={self.beta:g} noise={self.noise}"

    @property
    def ref(self) -> int:
        return max(self.widths)

    def shift(self, w: int) -> np.ndarray:
        n0 = min(self.widths)
        return self.beta * n0 * (1.0 / w - 1.0 / self.ref) * self.u

    def eps(self, rng: np.random.Generator, shape) -> np.ndarray:
        if self.noise == "t5":
            return rng.standard_t(5, shape) / math.sqrt(5 / 3)
        if self.noise == "lowrank":                        # unit variance per point, rank LOWRANK
            return rng.standard_normal((*shape[:-1], LOWRANK)) @ self.g.T
        return rng.standard_normal(shape)

    def noise_of(self, w: int, rng, shape) -> np.ndarray:
        return np.sqrt(self.a * self.h / w) * self.eps(rng, shape)

    def draw(self, rng: np.random.Generator) -> dict[int, torch.Tensor]:
        return {w: torch.from_numpy(self.mu + self.shift(w) + self.noise_of(w, rng, (self.seeds, self.points)))
                for w in self.widths}

    # ---- truths

    def truths(self, draws: int = TRUTH_DRAWS) -> dict[str, object]:
        rng = np.random.default_rng(20_000 + self.setting_seed)
        compared = [w for w in self.widths if w != self.ref]
        var = {w: self.a / w * float(self.h.mean()) for w in self.widths}
        b2 = {w: float(np.mean(self.shift(w) ** 2)) for w in compared}
        rmse, raw = {}, {}
        for w in compared:
            d = self.shift(w) + self.noise_of(w, rng, (draws, self.points)) \
                - self.noise_of(self.ref, rng, (draws, self.points))
            rmse[w] = float(np.sqrt((d * d).mean(1)).mean())
            mean_n = self.noise_of(w, rng, (draws, self.seeds, self.points)).mean(1)
            mean_r = self.noise_of(self.ref, rng, (draws, self.seeds, self.points)).mean(1)
            e = self.shift(w) + mean_n - mean_r
            raw[w] = float(np.sqrt((e * e).mean(1)).mean())
        slope = lambda d: float(np.polyfit(np.log(list(d)), np.log(list(d.values())), 1)[0])  # noqa: E731
        return {"seed_variance": var, "bias_sq_debiased": b2, "true_logit_rmse": rmse,
                "rmse_slope": slope(rmse), "variance_slope": slope(var), "bias_slope": slope(raw),
                "bias_beta_sq": (self.beta * min(self.widths)) ** 2, "bias_exponent": 2.0}


def _holds(ci, truth) -> bool | None:
    if ci is None or truth is None or not all(math.isfinite(v) for v in ci):
        return None
    return bool(ci[0] <= truth <= ci[1])


class Tally:
    """Coverage counts per (statistic, setting, seeds)."""

    def __init__(self):
        self.rows: dict[tuple, dict] = {}

    def row(self, stat: str, setting: str, seeds: int, truth: float | None) -> dict:
        """The counts of one (statistic, setting, seeds), made on first use."""
        return self.rows.setdefault((stat, setting, seeds), {"seeds": seeds, "setting": setting, "truth": truth,
                                                             "hits": 0, "repeats": 0, "no_interval": 0, "widths": []})

    def add(self, stat: str, setting: str, seeds: int, truth: float, ci) -> None:
        r = self.row(stat, setting, seeds, truth)
        got = _holds(ci, truth)
        if got is None:
            r["no_interval"] += 1
            return
        r["hits"] += got
        r["repeats"] += 1
        r["widths"].append(ci[1] - ci[0])

    def result(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for (stat, _, _), r in sorted(self.rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
            row = {k: v for k, v in r.items() if k not in ("hits", "widths")}
            row["coverage"] = r["hits"] / r["repeats"] if r["repeats"] else None
            row["median_width"] = float(np.median(r["widths"])) if r["widths"] else None
            out.setdefault(stat, []).append(row)
        return out


def calibrate_ensembles(sweep: Sweep, repeats: int, n_boot: int, tally: Tally, seed: int = 0,
                        truth_draws: int = TRUTH_DRAWS) -> None:
    """Every interval of SeedEnsembles' width rows and fit row over `repeats` draws of `sweep`."""
    truth = sweep.truths(truth_draws)
    rng = np.random.default_rng(seed)
    seeds = {w: list(range(sweep.seeds)) for w in sweep.widths}
    probe = [min(sweep.widths), sorted(sweep.widths)[len(sweep.widths) // 2]]
    for rep in range(repeats):
        est = SeedEnsembles(sweep.draw(rng), seeds, sweep.ref)
        rows = est.width_rows(n_boot, seed=rep)
        fit = est.fit_row(n_boot, seed=rep)
        for w in probe:
            tag = f"{sweep.name} N={w}"
            tally.add("seed_variance", tag, sweep.seeds, truth["seed_variance"][w], rows[w].get("seed_variance_ci"))
            tally.add("bias_sq_debiased", tag, sweep.seeds, truth["bias_sq_debiased"][w],
                      rows[w].get("bias_sq_debiased_ci"))
            tally.add("true_logit_rmse", tag, sweep.seeds, truth["true_logit_rmse"][w],
                      rows[w].get("true_logit_rmse_ci"))
        for key in ("rmse_slope", "variance_slope", "bias_slope", "bias_beta_sq"):
            if f"{key}_ci" in fit:
                tally.add(key, sweep.name, sweep.seeds, truth[key], fit[f"{key}_ci"])
        if "bias_exponent" in fit:
            _tally_exponent(tally, sweep, truth, fit)


def _tally_exponent(tally: Tally, sweep: Sweep, truth: dict, fit: dict) -> None:
    """The exponent's interval is scored where the fit calls the bias identified; the share of
    repeats identified is kept beside it (with β = 0 it is the false-detection rate)."""
    ident = fit.get("bias_exponent") is not None
    p = truth["bias_exponent"] if sweep.beta > 0 else None
    if ident:
        tally.add("bias_exponent", sweep.name, sweep.seeds, p, fit.get("bias_exponent_ci"))
    r = tally.row("bias_exponent", sweep.name, sweep.seeds, p)
    r["identified"] = r.get("identified", 0) + ident
    r["draws"] = r.get("draws", 0) + 1
    r["identified_share"] = r["identified"] / r["draws"]


def calibrate_tail_mean(seeds: int, repeats: int, n_boot: int, tally: Tally, evals: int = 4) -> None:
    """The report's late RMSE (report/intervals.py): a seed mean averaged over the last evaluations.
    Per seed a level μ + σ_s z_s (the seed effect) plus evaluation noise; the truth is μ."""
    rng = np.random.default_rng(7)
    for rep in range(repeats):
        m = 0.3 + 0.05 * rng.standard_normal((seeds, 1)) + 0.01 * rng.standard_normal((seeds, evals))
        tally.add("late_true_logit_rmse", "seed effect 0.05, eval noise 0.01", seeds, 0.3,
                  tail_mean_ci(m, n_boot, seed=rep)[1])


def calibrate_ensemble_curve(seeds: int, sigma: float, lowrank: bool, repeats: int, tally: Tally,
                             points: int = 200, classes: int = 10) -> None:
    """L∞ of L(E) = L∞ + c/E (stats/ensemble.EnsembleCurve) with its jackknife interval. Members'
    logits are μ + σ·ε on `points` examples of `classes` classes (ε independent, or of rank
    LOWRANK across the points); labels drawn from softmax(μ). The truth is the E → ∞ limit of the
    expected ensemble loss, the cross-entropy of μ itself."""
    rng = np.random.default_rng(31)
    mu = 2.0 * rng.standard_normal((points, classes))
    prob = np.exp(mu - mu.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    y = torch.tensor([rng.choice(classes, p=p) for p in prob])
    truth = float(torch.nn.functional.cross_entropy(torch.tensor(mu), y))
    g = rng.standard_normal((points * classes, LOWRANK)) / math.sqrt(LOWRANK)
    setting = f"sigma={sigma:g} noise={'lowrank' if lowrank else 'gauss'}"
    for _ in range(repeats):
        eps = (rng.standard_normal((seeds, LOWRANK)) @ g.T).reshape(seeds, points, classes) if lowrank \
            else rng.standard_normal((seeds, points, classes))
        curve = EnsembleCurve(seeds)
        curve.add(torch.tensor(mu[None] + sigma * eps), y)
        tally.add("ensemble_loss_inf", setting, seeds, truth, curve.result()["ensemble_loss_inf_ci"])


# --------------------------------------------------------------------------- the learning-rate drift

@dataclass
class DriftToy:
    """Population loss curves L_N(x), x = log η, and their noisy members (module docstring)."""
    seeds: int
    shape: str = "parabola"       # parabola | wall
    drift: float = 0.1
    grid_step: float = math.log(10 ** 0.5)   # the shipped half-decade grid
    widths: tuple = (64, 128, 256, 512, 1024)
    examples: int = 64
    seed_sd: float = 0.01
    example_sd: float = 0.3
    member_example_sd: float = 0.02
    refine: int = 0               # sweep.lr_refine: K rates added around each width's argmin

    @property
    def name(self) -> str:
        ratio = math.exp(self.grid_step)
        return (f"{self.shape} grid x{ratio:.3g}" + (f" drift={self.drift:+g}" if self.shape == "parabola" else "")
                + (f" lr_refine={self.refine}" if self.refine else ""))

    def curve(self, w: int, x: np.ndarray) -> np.ndarray:
        n = math.log(w / min(self.widths))
        if self.shape == "parabola":
            return 0.5 + 0.1 * (x - (math.log(1e-3) + self.drift * n)) ** 2
        # a fixed bowl at 1e-3 and a wall 0.5 decades above it that recedes by 0.25 per width doubling
        wall = math.log(10 ** -2.5) + 0.25 * n / math.log(2) * math.log(10) / 4
        return 0.5 + 0.05 * (x - math.log(1e-3)) ** 2 + 0.2 * np.exp((x - wall) / 0.5)

    def grid(self) -> np.ndarray:
        lo, hi = math.log(1e-5), math.log(1e-1)
        return np.exp(np.arange(lo, hi + 1e-9, self.grid_step))

    def truth(self) -> float:
        fine = np.linspace(math.log(1e-5), math.log(1e-1), 200_001)
        opt = [fine[np.argmin(self.curve(w, fine))] for w in self.widths]
        return float(np.polyfit(np.log(self.widths), opt, 1)[0])

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(learning rates, losses (W, R, S, P)) of one sweep; with `refine`, the coarse grid's
        losses pick each width's refined rates (stats/transfer.refine_lrs, as the loop's second
        pass does) and the union grid is returned, nan where a width did not train a rate."""
        W, S, P = len(self.widths), self.seeds, self.examples
        seed_off = self.seed_sd * rng.standard_normal((W, 1, S, 1))        # a seed fixes the init
        example = self.example_sd * rng.standard_normal((1, 1, 1, P))      # shared evaluation set

        def losses(lrs: np.ndarray) -> np.ndarray:
            base = np.stack([self.curve(w, np.log(lrs)) for w in self.widths])[:, :, None, None]
            return base + seed_off + example + self.member_example_sd * rng.standard_normal((W, len(lrs), S, P))

        lrs = self.grid()
        coarse = losses(lrs)
        if not self.refine:
            return lrs, coarse
        picks = refine_lrs(lrs, coarse.mean(axis=(2, 3)), self.refine)
        union = np.array(sorted(set(lrs.tolist()) | {v for p in picks for v in p}))
        out = np.full((W, len(union), S, P), np.nan)
        col = {v: j for j, v in enumerate(union.tolist())}
        out[:, [col[v] for v in lrs.tolist()]] = coarse
        for i, p in enumerate(picks):
            if p:
                out[i, [col[v] for v in p]] = losses(np.array(p))[i]
        return union, out


def calibrate_drift(toy: DriftToy, repeats: int, n_boot: int, tally: Tally) -> None:
    """Coverage of the drift's interval; the share of repeats flagged below_grid_resolution is kept
    beside it (a drift the grid cannot resolve is printed with that flag)."""
    truth = toy.truth()
    rng = np.random.default_rng(11)
    flagged = 0
    for rep in range(repeats):
        lrs, losses = toy.draw(rng)
        fit = transfer_fit(lrs, toy.widths, losses, n_boot=n_boot, seed=rep)
        tally.add("transfer_drift", toy.name, toy.seeds, truth, fit["ci"])
        flagged += bool(fit.get("below_grid_resolution"))
    tally.row("transfer_drift", toy.name, toy.seeds, truth)["below_grid_resolution_share"] = flagged / repeats


# --------------------------------------------------------------------------- the suite

SEED_COUNTS = (3, 4, 6)


def ensemble_settings(quick: bool) -> list[dict]:
    if quick:
        return [dict(beta=0.0), dict(beta=1.0)]
    return [dict(beta=0.0), dict(beta=0.5), dict(beta=1.0), dict(beta=0.0, noise="hetero"),
            dict(beta=1.0, noise="hetero"), dict(beta=0.0, noise="t5"), dict(beta=1.0, noise="t5"),
            dict(beta=0.0, noise="lowrank"), dict(beta=1.0, noise="lowrank")]


def drift_settings(quick: bool) -> list[dict]:
    base = [dict(shape="parabola", drift=0.0), dict(shape="parabola", drift=0.1)]
    if quick:
        return base
    return base + [dict(shape="wall"), dict(shape="wall", grid_step=math.log(2 ** 0.5)), dict(shape="wall", refine=4),
                   dict(shape="parabola", drift=0.1, refine=4)]


GROUPS = ("ensembles", "tail", "curve", "drift")


def run_suite(quick: bool = False, repeats: int | None = None, n_boot: int | None = None,
              seed_counts=SEED_COUNTS, progress=None, only=GROUPS) -> dict[str, list[dict]]:
    """The coverage table (module docstring); quick: fewer settings, repeats and resamples;
    `only`: which groups of statistics (ensembles: SeedEnsembles' rows and fits; tail: the late
    RMSE; curve: L∞ of the ensemble curve; drift: the learning-rate drift)."""
    repeats = repeats or (60 if quick else 200)
    n_boot = n_boot or (200 if quick else 1000)
    tally = Tally()
    jobs = [("ensembles", s, kw) for s in seed_counts for kw in ensemble_settings(quick)]
    jobs += [("tail", s, {}) for s in seed_counts]
    jobs += [("curve", s, dict(sigma=sig, lowrank=lr)) for s in seed_counts
             for sig, lr in ([(1.0, False)] if quick else [(0.3, False), (1.0, False), (1.0, True)])]
    jobs += [("drift", s, kw) for s in seed_counts for kw in drift_settings(quick)]
    jobs = [j for j in jobs if j[0] in only]
    t0 = time.time()
    for i, (what, s, kw) in enumerate(jobs):
        if what == "ensembles":
            # quick: 4000 draws put the Monte-Carlo truths within ~1/60 of an interval's width
            calibrate_ensembles(Sweep(seeds=s, **kw), repeats, n_boot, tally, seed=i,
                                truth_draws=4000 if quick else TRUTH_DRAWS)
        elif what == "tail":
            calibrate_tail_mean(s, repeats, n_boot, tally)
        elif what == "curve":
            calibrate_ensemble_curve(s, kw["sigma"], kw["lowrank"], repeats, tally, points=80 if quick else 200)
        else:
            calibrate_drift(DriftToy(seeds=s, **kw), repeats, min(n_boot, 400), tally)
        if progress:
            progress(f"[{i + 1}/{len(jobs)}] {what} seeds={s} {kw} ({time.time() - t0:.0f} s)")
    return tally.result()


def markdown(table: dict[str, list[dict]]) -> str:
    lines = ["| statistic | setting | seeds | truth | coverage | repeats | median width | note |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for stat, rows in table.items():
        for r in rows:
            cov = "–" if r["coverage"] is None else f"{r['coverage']:.3f}"
            truth = "–" if r["truth"] is None else f"{r['truth']:.4g}"
            width = "–" if r.get("median_width") is None else f"{r['median_width']:.3g}"
            note = []
            if r.get("no_interval"):
                note.append(f"{r['no_interval']} without interval")
            if "identified_share" in r:
                note.append(f"identified in {r['identified_share']:.0%}")
            if r.get("below_grid_resolution_share"):
                note.append(f"flagged below_grid_resolution in {r['below_grid_resolution_share']:.0%}")
            lines.append(f"| {stat} | {r['setting']} | {r['seeds']} | {truth} | {cov} | {r['repeats']} | {width} "
                         f"| {'; '.join(note)} |")
    return "\n".join(lines) + "\n"


def lowest_coverage(table: dict[str, list[dict]], skip=("bias_exponent",)) -> dict[tuple[str, int], tuple]:
    """{(statistic, seeds): (lowest coverage over settings, its setting)}; the exponent (scored only
    where identified) and drift settings the grid cannot resolve are listed in the full table."""
    out = {}
    for stat, rows in table.items():
        if stat in skip:
            continue
        for r in rows:
            if r["coverage"] is None or r.get("below_grid_resolution_share", 0) > 0.5:
                continue
            key = (stat, r["seeds"])
            if key not in out or r["coverage"] < out[key][0]:
                out[key] = (r["coverage"], r["setting"])
    return out


def compare_markdown(before: dict, after: dict) -> str:
    """Lowest coverage per statistic and seed count, before and after (docs/calibration.md)."""
    b, a = lowest_coverage(before), lowest_coverage(after)
    lines = ["| statistic | seeds | lowest coverage before (setting) | lowest coverage after (setting) |",
             "|---|---:|---|---|"]
    for key in sorted(set(a) | set(b)):
        cell = lambda d: f"{d[key][0]:.3f} ({d[key][1]})" if key in d else "–"  # noqa: E731
        lines.append(f"| {key[0]} | {key[1]} | {cell(b)} | {cell(a)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastwidth.stats.calibrate",
                                 description="coverage of every reported interval on synthetic sweeps with a planted truth")
    ap.add_argument("--quick", action="store_true", help="fewer settings, 60 repeats, 200 resamples")
    ap.add_argument("--json", required=True, help="output file for the coverage table")
    ap.add_argument("--md", help="also write the table as markdown")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--seeds", default=",".join(map(str, SEED_COUNTS)), help="seed counts, comma separated")
    ap.add_argument("--only", default=",".join(GROUPS), help=f"groups, comma separated: {', '.join(GROUPS)}")
    args = ap.parse_args(argv)
    only = tuple(args.only.split(","))
    try:
        seed_counts = tuple(int(s) for s in args.seeds.split(","))
        if min(seed_counts) < 2 or (args.repeats is not None and args.repeats < 1):
            raise ValueError
    except ValueError:
        print(f"calibrate: --seeds {args.seeds!r} / --repeats {args.repeats!r}: seeds are integers >= 2 "
              "separated by commas, repeats >= 1", file=sys.stderr)
        return 2
    if not set(only) <= set(GROUPS):
        print(f"calibrate: --only {args.only!r}: groups are {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    table = run_suite(args.quick, args.repeats, seed_counts=seed_counts, only=only,
                      progress=lambda m: print(m, file=sys.stderr, flush=True))
    with open(args.json, "w") as f:
        json.dump(table, f, indent=1, allow_nan=False)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(table))
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
