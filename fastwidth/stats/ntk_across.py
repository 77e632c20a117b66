"""The eNTK across seeds and widths, from the kernels each evaluation stored (stats/signature.py).

    cos = principal_cosines(U_N, U_ref)                  # (k,) cosines of the principal angles
    out = ntk_across_widths(members, ref_width=1024)     # members: [NTKMember(width, seed, K, U, labels, cls)]

Ensemble eNTK (the paper's, Vyas et al. 2023 §5): K̄_N = (1/S) Σ_s K_{N,s}, the mean over seeds of
one width's kernels on the same probe points. It estimates the seed-expected kernel E_s[K_N]; its
spectrum and task power C(k) are those of that estimate (a plug-in: with S seeds the mean kernel
still holds Var_s(K)/S of seed noise, which lifts the small eigenvalues; no correction is made, and
no interval is reported: with S >= 2 the per-seed numbers below show the spread).

Alignment of eigenspaces: for orthonormal U (n, k) and V (n, k) the cosines of the principal
angles between span(U) and span(V) are the singular values of UᵀV (Björck & Golub 1973), all 1
when the spaces coincide; mean cos² = ‖UᵀV‖_F² / k is the share of one space's projector that the
other captures. Reported per same-seed pair (width N seed s against the reference width's seed s,
each on its own stored top-k eigenvectors) and between the seed-averaged kernels' top-k spaces.
Near-degenerate eigenvalues at the k-th place make a single space ill-defined; the cosines are then
low for both pairs alike, which is why the seed-averaged comparison is reported beside them.

Same-width baseline (`same_width_baseline`): the same two numbers among the reference width's own
seeds, so the cross-width cos² can be read against what seed noise alone leaves: the top-k spaces
of the seed-averaged kernels of two disjoint halves of the seeds (stats/same_width.py's split),
and single seeds against each other (mean over pairs s < s'). Each cross-width width also gets the
half-sized comparison (its half B against the reference's half A), whose ceiling the baseline's
halves are; the full S-seed averaged kernels have no same-width twin with disjoint seeds.

Spectral mechanism (`spectral_mechanism`, drawn by report/spectral.py): per width the averaged
kernel's λ_k/tr, C(k) of a ±1 target, ΔC(k) and the log-eigenvalue discrepancy against the
reference, and ridge regression of the target with the averaged kernel, with bootstrap intervals
over seeds (resample, re-average, recompute) and the same halves baseline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import torch

from fastwidth.stats.ntk import eigh_desc, one_vs_rest, task_power
from fastwidth.stats.same_width import TOO_FEW, split_halves


@dataclass
class NTKMember:
    width: int
    seed: int
    kernel: torch.Tensor          # (n, n)
    eigenvectors: torch.Tensor    # (n, k) top-k, descending
    labels: torch.Tensor          # (n,) targets of the points
    cls: int                      # the class of the scalar output / task vector


def principal_cosines(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(U) and span(V), descending, in [0, 1].
    Both are orthonormalized first (stored fp32 eigenvectors are orthonormal to ~1e-7 only)."""
    qu = torch.linalg.qr(U.double())[0]
    qv = torch.linalg.qr(V.double())[0]
    return torch.linalg.svdvals(qu.T @ qv).clamp(0.0, 1.0)


def mean_cos2(cosines: torch.Tensor) -> float:
    return float((cosines ** 2).mean())


def ensemble_kernel(kernels: list[torch.Tensor]) -> torch.Tensor:
    """K̄ = mean over seeds, in fp64."""
    return torch.stack([K.double() for K in kernels]).mean(0)


def half_space(members: list[NTKMember], half: int, k: int) -> torch.Tensor | None:
    """Top-k eigenvectors (n, k) of the seed-averaged kernel of half A (half=0) or half B (half=1)
    of these members' seeds (stats/same_width.py's split); None with fewer than 2 seeds."""
    seeds = {m.seed: m for m in members}
    halves = split_halves(seeds)
    if halves is None:
        return None
    return eigh_desc(ensemble_kernel([seeds[s].kernel for s in halves[half]]))[1][:, :k]


def same_width_baseline(members: list[NTKMember], k: int) -> dict:
    """Principal angles between top-k eNTK eigenspaces of one width's own seeds.

    Returns {"width", "seeds", "half_a", "half_b", "halves_cosines", "halves_mean_cos2" (the
    seed-averaged kernel of half A against that of half B), "pairs_mean_cos2" (mean over seed pairs
    of the stored per-seed top-k spaces), "pairs_range" [min, max], "n_pairs"}; with fewer than 2
    seeds {"width", "seeds", "note"}.

    What they estimate: `pairs_mean_cos2` is unbiased for the expected mean cos² between two
    independent seeds: the like-for-like ceiling of the cross-width same-seed column.
    `halves_mean_cos2` is that between an ensemble of floor(S/2) seeds and one of the rest: the
    ceiling of the cross-width `halves_mean_cos2` (same ensemble sizes), in expectation above the
    pairs (averaging removes seed noise) and below what two S-seed ensembles, as in the cross-width
    averaged-kernel column, would give. For random spaces the expectation is k/n, not 0. No
    interval: one split, and pairs that share seeds.
    """
    seeds = {m.seed: m for m in members}
    halves = split_halves(seeds)
    width = members[0].width
    if halves is None:
        return {"width": width, "seeds": sorted(seeds), "note": TOO_FEW}
    a, b = halves
    cos = principal_cosines(half_space(members, 0, k), half_space(members, 1, k))
    pairs = [mean_cos2(principal_cosines(seeds[s].eigenvectors[:, :k], seeds[t].eigenvectors[:, :k]))
             for s, t in combinations(a + b, 2)]
    return {"width": width, "seeds": a + b, "half_a": a, "half_b": b, "halves_cosines": cos.tolist(),
            "halves_mean_cos2": mean_cos2(cos), "pairs_mean_cos2": sum(pairs) / len(pairs),
            "pairs_range": [min(pairs), max(pairs)], "n_pairs": len(pairs)}


def _check_points(members: list[NTKMember]) -> None:
    first = members[0]
    for m in members[1:]:
        if m.kernel.shape != first.kernel.shape or not torch.equal(m.labels, first.labels):
            raise ValueError(f"eNTK of width {m.width} seed {m.seed} is on other probe points than width "
                             f"{first.width} seed {first.seed}: compare kernels of one probe")


def ntk_across_widths(members: list[NTKMember], ref_width: int, k: int | None = None) -> dict:
    """Seed-averaged kernels per width and their alignment with the reference width.

    Returns {"k", "points", "ref_width", "widths": [{"width", "n_seeds", "eigenvalues",
    "task_power" (C(k) of class cls, k = 1..n), "task_power_class_mean" (mean over classes of the
    one-vs-rest C_c(k)), "task_power_by_class_at_k" {c: C_c(k)}, and for widths other than the
    reference: "same_seed": [{"seed", "cosines", "mean_cos2"}], "same_seed_mean_cos2" (mean over
    seeds), "ensemble_cosines", "ensemble_mean_cos2", "halves_cosines", "halves_mean_cos2" (the
    averaged kernel of this width's half B of seeds against the reference width's half A; None
    with fewer than 2 seeds)}], "same_width_baseline": the reference width's own seeds against each
    other (same_width_baseline)}. k defaults to the stored eigenvectors' k.
    """
    if not members:
        return {}
    _check_points(members)
    k = min(k or members[0].eigenvectors.shape[1], *(m.eigenvectors.shape[1] for m in members))
    labels, cls = members[0].labels, members[0].cls
    classes = sorted(set(labels.tolist()))
    by_w: dict[int, list[NTKMember]] = {}
    for m in sorted(members, key=lambda m: (m.width, m.seed)):
        by_w.setdefault(m.width, []).append(m)
    if ref_width not in by_w:
        raise ValueError(f"no stored eNTK at the reference width {ref_width} (widths {sorted(by_w)})")
    avg = {w: eigh_desc(ensemble_kernel([m.kernel for m in ms])) for w, ms in by_w.items()}
    ref_space = avg[ref_width][1][:, :k]
    ref_seeds = {m.seed: m for m in by_w[ref_width]}
    ref_half_a = half_space(by_w[ref_width], 0, k)
    out = []
    for w, ms in by_w.items():
        evals, evecs = avg[w]
        by_class = {c: task_power(evecs, one_vs_rest(labels, c)) for c in classes}
        row = {"width": w, "n_seeds": len(ms), "seeds": [m.seed for m in ms], "reference": w == ref_width,
               "eigenvalues": evals.tolist(), "task_power": task_power(evecs, one_vs_rest(labels, cls)).tolist(),
               "task_power_class_mean": torch.stack(list(by_class.values())).mean(0).tolist(),
               "task_power_by_class_at_k": {str(c): float(v[k - 1]) for c, v in by_class.items()}}
        if w != ref_width:
            pairs = []
            for m in ms:
                if m.seed in ref_seeds:
                    cos = principal_cosines(m.eigenvectors[:, :k], ref_seeds[m.seed].eigenvectors[:, :k])
                    pairs.append({"seed": m.seed, "cosines": cos.tolist(), "mean_cos2": mean_cos2(cos)})
            ens = principal_cosines(evecs[:, :k], ref_space)
            # width N's half B against the reference's half A: the ensemble sizes of the baseline
            half_b = half_space(ms, 1, k)
            halves = principal_cosines(half_b, ref_half_a) if half_b is not None and ref_half_a is not None else None
            row.update(halves_cosines=None if halves is None else halves.tolist(),
                       halves_mean_cos2=None if halves is None else mean_cos2(halves))
            row.update(same_seed=pairs,
                       same_seed_mean_cos2=sum(p["mean_cos2"] for p in pairs) / len(pairs) if pairs else None,
                       ensemble_cosines=ens.tolist(), ensemble_mean_cos2=mean_cos2(ens))
        out.append(row)
    return {"k": k, "points": int(labels.numel()), "ref_width": ref_width, "ntk_class": cls, "widths": out,
            "same_width_baseline": same_width_baseline(by_w[ref_width], k)}


# ---- the spectral mechanism (report/spectral.py): spectra, task power, after-kernel regression,
# with bootstrap intervals over seeds

def pm1_target(labels: torch.Tensor, cls: int) -> torch.Tensor:
    """The ±1 task vector by label: +1 where the label is `cls`, −1 elsewhere (fp64). With 2 classes
    the eNTK's "class" output z_cls − mean_c z_c = ±(z0 − z1)/2 is the logit this target fits."""
    return torch.where(labels == cls, 1.0, -1.0).double()


def normalized_spectrum(K: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ_1..λ_k / tr K, all n eigenvectors), eigenvalues descending."""
    evals, evecs = eigh_desc(K)
    return evals[:k] / evals.sum(), evecs


def log_discrepancy(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS over k of log(a_k) − log(b_k) for two normalized spectra (nan where an entry is <= 0)."""
    if (a <= 0).any() or (b <= 0).any():
        return float("nan")
    return float(((a.log() - b.log()) ** 2).mean().sqrt())


def ridge_regression_error(K: torch.Tensor, y: torch.Tensor, n_train: int, ridge: float) -> tuple[float, float]:
    """(test MSE, test sign error) of kernel ridge regression of y with K: the first n_train points
    train, the rest test. α = (K_tr + ridge·mean(diag K_tr)·I)⁻¹ y_tr, ŷ_te = K_te,tr α (the ridge is
    relative to the kernel's scale, so one value fits every width and step)."""
    K, y = K.double(), y.double()
    tr, te = slice(0, n_train), slice(n_train, None)
    ktr = K[tr, tr]
    reg = ridge * float(ktr.diagonal().mean())
    alpha = torch.linalg.solve(ktr + reg * torch.eye(n_train, dtype=K.dtype), y[tr])
    pred = K[te, tr] @ alpha
    return float(((pred - y[te]) ** 2).mean()), float((torch.sign(pred) != torch.sign(y[te])).double().mean())


def _kernel_numbers(K: torch.Tensor, y: torch.Tensor, k_max: int, n_train: int, ridge: float) -> dict:
    lam, evecs = normalized_spectrum(K, k_max)
    mse, sign = ridge_regression_error(K, y, n_train, ridge)
    return {"lam": lam, "C": task_power(evecs, y)[:k_max], "mse": mse, "sign": sign}


def _ci(observed: float, samples: list[float], n_seeds: int, lo: float = -math.inf, hi: float = math.inf) -> list | None:
    """Expanded basic bootstrap interval over seeds (stats/ensemble.py), covering its point and
    clipped to the statistic's range [lo, hi] (a reflected basic interval can leave it)."""
    from fastwidth.stats.ensemble import MIN_SEEDS_CI, basic_ci, covering, expansion
    if n_seeds < MIN_SEEDS_CI:
        return None
    ci = covering(basic_ci(observed, samples, observed, expand=expansion([n_seeds])), observed)
    return None if ci is None else [max(ci[0], lo), min(ci[1], hi)]


def spectral_mechanism(kernels: dict[int, list[torch.Tensor]], target: torch.Tensor, ref_width: int, *,
                       k_max: int = 32, k_c: int = 16, n_train: int = 192, ridge: float = 1e-3,
                       n_boot: int = 200, seed: int = 0) -> dict:
    """Seed-averaged eNTKs per width against the reference width's, with bootstrap intervals over seeds.

    kernels: {width: [K_s (n, n) per seed, sorted by seed]}, all on the same points; target (n,) the
    ±1 task vector. Per width: λ_k/tr (k <= k_max) of K̄ = mean_s K_s; C(k) (k <= k_max) of the target
    in K̄'s eigenvectors; ΔC(k_c) = C_ref(k_c) − C_N(k_c); the eigenvalue discrepancy D = RMS_{k<=k_max}
    of log(λ_k/tr)_N − log(λ_k/tr)_ref; the kernel-ridge test MSE and sign error of the target with K̄
    (points [:n_train] train, the rest test). Intervals: seeds resampled with replacement per width
    (independently for N and the reference), the kernels re-averaged and everything recomputed;
    expanded basic intervals (stats/ensemble.py), None with fewer than 3 seeds.

    Baseline (what sampling alone gives): the reference width's seeds split into two disjoint halves
    (stats/same_width.py's split), D and ΔC(k_c) between the halves' averaged kernels, and per width the
    same quantities between its half B and the reference's half A (like-for-like ensemble sizes).
    With S seeds the halves average S/2 seeds each, so the baseline is the noise floor of a comparison
    of S/2-seed ensembles, about √2 above that of the all-seed comparison.
    """
    if ref_width not in kernels:
        raise ValueError(f"no eNTK at the reference width {ref_width} (widths {sorted(kernels)})")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # many small eighs: one thread is ~30x faster than 2 on a loaded 2-core machine
    try:
        return _spectral_mechanism(kernels, target, ref_width, k_max, k_c, n_train, ridge, n_boot, seed)
    finally:
        torch.set_num_threads(threads)


def _spectral_mechanism(kernels, target, ref_width, k_max, k_c, n_train, ridge, n_boot, seed) -> dict:
    y = target.double()
    stacks = {w: torch.stack([K.double() for K in ks]) for w, ks in kernels.items()}   # (S, n, n)
    point = {w: _kernel_numbers(st.mean(0), y, k_max, n_train, ridge) for w, st in stacks.items()}
    rng = torch.Generator().manual_seed(seed)
    boot = {w: [] for w in stacks}
    for w, st in stacks.items():
        s = st.shape[0]
        for _ in range(n_boot if s >= 2 else 0):
            idx = torch.randint(0, s, (s,), generator=rng)
            boot[w].append(_kernel_numbers(st[idx].mean(0), y, k_max, n_train, ridge))

    def halves_of(w: int) -> tuple[dict, dict] | None:
        h = split_halves(range(stacks[w].shape[0]))
        if h is None:
            return None
        return tuple(_kernel_numbers(stacks[w][list(part)].mean(0), y, k_max, n_train, ridge) for part in h)

    ref, ref_h = point[ref_width], halves_of(ref_width)
    rows = []
    for w in sorted(stacks):
        p, b, s = point[w], boot[w], stacks[w].shape[0]
        row = {"width": w, "n_seeds": s, "reference": w == ref_width, "k_max": k_max, "k_c": k_c,
               "eigenvalues_norm": p["lam"].tolist(), "task_power": p["C"].tolist(),
               "task_power_ci": [_ci(float(p["C"][i]), [float(x["C"][i]) for x in b], s, 0.0, 1.0) for i in range(k_max)],
               "test_mse": p["mse"], "test_mse_ci": _ci(p["mse"], [x["mse"] for x in b], s, 0.0),
               "test_sign_error": p["sign"], "test_sign_error_ci": _ci(p["sign"], [x["sign"] for x in b], s, 0.0, 1.0)}
        row["c_k"] = row["task_power"][k_c - 1]
        row["c_k_ci"] = row["task_power_ci"][k_c - 1]
        if w != ref_width:
            rb = boot[ref_width]
            nb = min(len(b), len(rb))
            dc = float(ref["C"][k_c - 1] - p["C"][k_c - 1])
            disc = log_discrepancy(p["lam"], ref["lam"])
            row.update(delta_c=dc, delta_c_ci=_ci(dc, [float(rb[i]["C"][k_c - 1] - b[i]["C"][k_c - 1])
                                                       for i in range(nb)], min(s, stacks[ref_width].shape[0])),
                       discrepancy=disc, discrepancy_ci=_ci(disc, [log_discrepancy(b[i]["lam"], rb[i]["lam"])
                                                                for i in range(nb)], min(s, stacks[ref_width].shape[0]), 0.0))
            hw = halves_of(w)
            if hw is not None and ref_h is not None:
                row.update(halves_delta_c=float(ref_h[0]["C"][k_c - 1] - hw[1]["C"][k_c - 1]),
                           halves_discrepancy=log_discrepancy(hw[1]["lam"], ref_h[0]["lam"]))
        rows.append(row)
    base = None
    if ref_h is not None:
        a, b = split_halves(range(stacks[ref_width].shape[0]))
        base = {"width": ref_width, "half_a": a, "half_b": b,
                "delta_c": float(ref_h[0]["C"][k_c - 1] - ref_h[1]["C"][k_c - 1]),
                "discrepancy": log_discrepancy(ref_h[1]["lam"], ref_h[0]["lam"])}
    return {"ref_width": ref_width, "k_max": k_max, "k_c": k_c, "points": int(y.numel()), "n_train": n_train,
            "ridge": ridge, "n_boot": n_boot, "widths": rows, "baseline": base}
