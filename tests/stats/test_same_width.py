"""Same-width baselines (CKA, eNTK principal angles) on kernels whose answer is known."""
import itertools

import pytest
import torch

from fastwidth.stats.metrics import cka
from fastwidth.stats.ntk import eigh_desc
from fastwidth.stats.ntk_across import NTKMember, ntk_across_widths, same_width_baseline
from fastwidth.stats.same_width import cka_same_width, split_halves

P = 24


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _low_rank(seed, rank=2):
    """Φ = φφᵀ/r of r random features: independent draws share no structure."""
    phi = torch.randn(P, rank, generator=_gen(seed), dtype=torch.float64)
    return phi @ phi.T / rank


@pytest.mark.parametrize("seeds,a,b", [([3, 0, 2, 1], [0, 1], [2, 3]), ([2, 0, 1], [0], [1, 2]),
                                       ([7, 5], [5], [7]), ([4, 0, 9, 1, 6], [0, 1], [4, 6, 9])])
def test_split_is_disjoint_deterministic_and_covers_the_seeds(seeds, a, b):
    for order in itertools.permutations(seeds):
        assert split_halves(order) == (a, b)
    assert not set(a) & set(b) and sorted(a + b) == sorted(seeds)


def test_fewer_than_two_seeds_have_no_baseline():
    assert split_halves([0]) is None and split_halves([]) is None
    out = cka_same_width({3: {"layer0": _low_rank(0)}})
    assert out["seeds"] == [3] and "fewer than 2 seeds" in out["note"] and "pairs" not in out


def test_identical_seeds_give_cka_one():
    K = _low_rank(0, rank=5)
    out = cka_same_width({s: {"layer0": K, "layer1": 2 * K} for s in range(3)})
    assert (out["half_a"], out["half_b"], out["n_pairs"]) == ([0], [1, 2], 3)
    for layer in ("layer0", "layer1"):
        assert out["halves"][layer] == pytest.approx(1.0) and out["pairs"][layer] == pytest.approx(1.0)
        assert out["pairs_range"][layer] == pytest.approx([1.0, 1.0])


def test_independent_kernels_give_low_cka_and_shared_ones_the_pairs_formula():
    """Independent rank-2 kernels: both numbers low. Shared signal + seed noise: averaging removes
    noise, so the halves agree more than single seeds; pairs equal the mean over s < s' by hand."""
    indep = cka_same_width({s: {"layer0": _low_rank(10 + s)} for s in range(4)})
    assert indep["pairs"]["layer0"] < 0.3 and indep["halves"]["layer0"] < 0.3
    shared = _low_rank(99, rank=3)
    ks = {s: shared + 0.7 * _low_rank(20 + s, rank=3) for s in range(4)}
    out = cka_same_width({s: {"layer0": k} for s, k in ks.items()})
    by_hand = [cka(ks[s], ks[t]) for s, t in itertools.combinations(range(4), 2)]
    assert out["pairs"]["layer0"] == pytest.approx(sum(by_hand) / 6)
    assert out["pairs_range"]["layer0"] == pytest.approx([min(by_hand), max(by_hand)])
    assert out["halves"]["layer0"] == pytest.approx(cka((ks[0] + ks[1]) / 2, (ks[2] + ks[3]) / 2))
    assert indep["pairs"]["layer0"] < out["pairs"]["layer0"] < out["halves"]["layer0"] < 1


def _ntk(width, seed, K, k):
    _, U = eigh_desc(K)
    return NTKMember(width, seed, K.float(), U[:, :k].float(), torch.arange(P) % 3, 0)


def test_ntk_baseline_of_identical_kernels_is_one_and_sits_in_the_cross_width_output():
    K = _low_rank(1, rank=P) + torch.diag(torch.linspace(3, 0, P, dtype=torch.float64))
    members = [_ntk(w, s, K * (1 + 0.01 * s), 4) for w in (8, 16) for s in range(3)]
    b = ntk_across_widths(members, ref_width=16)["same_width_baseline"]
    assert (b["width"], b["half_a"], b["half_b"], b["n_pairs"]) == (16, [0], [1, 2], 3)
    assert b["halves_cosines"] == pytest.approx([1.0] * 4, abs=1e-6)
    assert b["pairs_mean_cos2"] == pytest.approx(1.0, abs=1e-6)
    assert "fewer than 2 seeds" in same_width_baseline(members[:1], 4)["note"]


def test_ntk_baseline_of_independent_kernels_is_k_over_n():
    """Wishart kernels GGᵀ have Haar-random eigenvectors (and so do means of them), so the mean cos²
    between two independent top-k spaces has expectation k/n; over 30 draws of 3 seeds it lands there."""
    k, halves, pairs = 4, [], []
    for rep in range(30):
        members = []
        for s in range(3):
            G = torch.randn(P, P, generator=_gen(1000 * rep + s), dtype=torch.float64)
            members.append(_ntk(16, s, G @ G.T, k))
        b = same_width_baseline(members, k)
        halves.append(b["halves_mean_cos2"])
        pairs.append(b["pairs_mean_cos2"])
    assert sum(halves) / 30 == pytest.approx(k / P, abs=0.04)
    assert sum(pairs) / 30 == pytest.approx(k / P, abs=0.03)


def test_cross_width_halves_match_the_baseline_when_a_width_copies_the_reference():
    """Width 8's seeds carry the reference's kernels seed for seed: its half B against the reference's
    half A is the reference's own half B against half A, so the two numbers are equal (not just close)."""
    kernels = [(lambda G: G @ G.T)(torch.randn(P, P, generator=_gen(s), dtype=torch.float64)) for s in range(3)]
    members = [_ntk(w, s, K, 4) for w in (8, 16) for s, K in enumerate(kernels)]
    out = ntk_across_widths(members, ref_width=16)
    w8, b = out["widths"][0], out["same_width_baseline"]
    assert w8["halves_mean_cos2"] == pytest.approx(b["halves_mean_cos2"], abs=1e-12) and b["halves_mean_cos2"] < 0.9
    assert w8["same_seed_mean_cos2"] == pytest.approx(1.0, abs=1e-6)
