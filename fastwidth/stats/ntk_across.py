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
"""
from __future__ import annotations

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
