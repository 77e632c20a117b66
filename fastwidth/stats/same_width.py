"""Same-width baselines: how far apart two models of ONE width and different seeds are, so a
cross-width number (CKA, eNTK principal angles) can be read against the best it could be.

    a, b = split_halves([0, 1, 2])                   # ([0], [1, 2]); None with fewer than 2 seeds
    out = cka_same_width({seed: {layer: Φ}})         # half-mean vs half-mean, and seed pairs

The split is fixed: the seeds sorted, the first floor(S/2) in half A and the rest in half B (with
S = 2 one seed each), so the halves are disjoint and the same on every evaluation and every run
of the same seeds. The eNTK's baseline (principal angles between the halves' seed-averaged
kernels) is in stats/ntk_across.py and uses the same split.
"""
from __future__ import annotations

from itertools import combinations

import torch

from fastwidth.stats.metrics import cka

TOO_FEW = "fewer than 2 seeds at the reference width: no other seed to compare with"


def split_halves(seeds) -> tuple[list[int], list[int]] | None:
    """Two disjoint halves of the sorted seeds: the first floor(S/2) and the rest; None when S < 2."""
    s = sorted(int(x) for x in set(seeds))
    if len(s) < 2:
        return None
    return s[:len(s) // 2], s[len(s) // 2:]


def mean_kernel(kernels: list[torch.Tensor]) -> torch.Tensor:
    """The mean over seeds of one layer's kernels, in fp64 (stored kernels are fp16)."""
    return torch.stack([torch.as_tensor(k).double() for k in kernels]).mean(0)


def cka_same_width(kernels: dict[int, dict[str, torch.Tensor]]) -> dict:
    """CKA between models of the same width and different seeds, per layer.

    kernels: {seed: {layer: Φ (P, P)}}, every seed on the same probe points; layers present in
    every seed are used.

    Returns {"seeds", "half_a", "half_b", "halves": {layer: CKA(mean_A Φ, mean_B Φ)},
    "pairs": {layer: mean over seed pairs s < s' of CKA(Φ_s, Φ_s')}, "pairs_range": {layer:
    [min, max]}, "n_pairs"}; with fewer than 2 seeds {"seeds", "note"} and nothing else.

    What they estimate: `pairs` is a U-statistic over the S(S-1)/2 pairs, unbiased for the
    expected CKA between two independent seeds of this width: the like-for-like ceiling of a
    cross-width row, which compares one model with one reference model. `halves` estimates the
    CKA between an ensemble of floor(S/2) seeds and one of the rest: averaging removes seed noise,
    so in expectation it lies above `pairs` (with 3 seeds one half is a single model, and on the
    demo it fell 0.005 below them in one of two layers), and below what two S-seed ensembles would
    give (the halves are noisier).
    No interval is reported: with the demo's 3 seeds there is one split and 3 pairs, which share
    seeds; `pairs_range` shows the spread over pairs.
    """
    halves = split_halves(kernels)
    if halves is None:
        return {"seeds": sorted(kernels), "note": TOO_FEW}
    a, b = halves
    layers = sorted(set.intersection(*(set(k) for k in kernels.values())))
    out = {"seeds": a + b, "half_a": a, "half_b": b, "halves": {}, "pairs": {}, "pairs_range": {},
           "n_pairs": len(a + b) * (len(a + b) - 1) // 2}
    for layer in layers:
        out["halves"][layer] = cka(mean_kernel([kernels[s][layer] for s in a]),
                                   mean_kernel([kernels[s][layer] for s in b]))
        pair = [cka(kernels[s][layer], kernels[t][layer]) for s, t in combinations(a + b, 2)]
        out["pairs"][layer] = sum(pair) / len(pair)
        out["pairs_range"][layer] = [min(pair), max(pair)]
    return out
