"""Seed-averaged eNTKs and principal angles across widths, on kernels whose answer is known."""
import math

import pytest
import torch

from fastwidth.stats.ntk import eigh_desc, one_vs_rest, task_power
from fastwidth.stats.ntk_across import NTKMember, ensemble_kernel, ntk_across_widths, principal_cosines

N, K = 12, 3
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 0])
LAMBDA = torch.tensor([10.0, 8.0, 6.0, 4.0] + [1.0 / (i + 2) for i in range(N - 4)], dtype=torch.float64)


def _basis(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))[0]


def _member(width, seed, kernel):
    _, U = eigh_desc(kernel)
    return NTKMember(width, seed, kernel.float(), U[:, :K].float(), LABELS, 0)


def test_identical_kernels_have_all_cosines_one():
    Q = _basis()
    Kr = Q @ torch.diag(LAMBDA) @ Q.T
    out = ntk_across_widths([_member(8, 0, Kr), _member(16, 0, Kr)], ref_width=16)
    w8 = out["widths"][0]
    assert w8["width"] == 8 and out["k"] == K
    assert w8["same_seed"][0]["cosines"] == pytest.approx([1.0] * K, abs=1e-6)
    assert w8["ensemble_cosines"] == pytest.approx([1.0] * K, abs=1e-12)
    assert w8["ensemble_mean_cos2"] == pytest.approx(1.0) and w8["same_seed_mean_cos2"] == pytest.approx(1.0, abs=1e-6)
    assert "same_seed" not in out["widths"][1] and out["widths"][1]["reference"]


@pytest.mark.parametrize("theta", [0.3, 1.1])
def test_a_rotated_eigenspace_gives_its_angle(theta):
    """Rotate the top eigenvector q1 towards q_{k+1} (outside the top-k space) by θ: the principal
    angles between the two top-k spaces are (0, ..., 0, θ), so the cosines are (1, ..., 1, cos θ)."""
    Q = _basis(1)
    R = Q.clone()
    R[:, 0] = math.cos(theta) * Q[:, 0] + math.sin(theta) * Q[:, K]
    R[:, K] = -math.sin(theta) * Q[:, 0] + math.cos(theta) * Q[:, K]
    Kref, Kw = Q @ torch.diag(LAMBDA) @ Q.T, R @ torch.diag(LAMBDA) @ R.T
    want = [1.0] * (K - 1) + [math.cos(theta)]
    assert principal_cosines(Q[:, :K], R[:, :K]).tolist() == pytest.approx(want, abs=1e-12)
    out = ntk_across_widths([_member(64, 3, Kw), _member(256, 3, Kref)], ref_width=256)
    w = out["widths"][0]
    assert w["same_seed"][0]["seed"] == 3 and w["same_seed"][0]["cosines"] == pytest.approx(want, abs=1e-5)
    assert w["ensemble_cosines"] == pytest.approx(want, abs=1e-5)
    assert w["ensemble_mean_cos2"] == pytest.approx((K - 1 + math.cos(theta) ** 2) / K, abs=1e-5)
    assert math.acos(w["ensemble_cosines"][-1]) == pytest.approx(theta, abs=1e-4)


def test_averaged_kernel_is_the_mean_of_the_stored_kernels():
    g = torch.Generator().manual_seed(5)
    kernels = {}
    for w in (8, 16):
        for s in (0, 1, 2):
            a = torch.randn(N, N, generator=g, dtype=torch.float64)
            kernels[(w, s)] = a @ a.T / N
    members = [_member(w, s, Kx) for (w, s), Kx in kernels.items()]
    out = ntk_across_widths(members, ref_width=16)
    for row in out["widths"]:
        mean = sum(kernels[(row["width"], s)].float().double() for s in (0, 1, 2)) / 3
        torch.testing.assert_close(ensemble_kernel([m.kernel for m in members if m.width == row["width"]]), mean)
        ev, U = eigh_desc(mean)
        assert row["n_seeds"] == 3 and row["eigenvalues"] == pytest.approx(ev.tolist(), rel=1e-10)
        assert row["task_power"] == pytest.approx(task_power(U, one_vs_rest(LABELS, 0)).tolist(), abs=1e-10)
        mean_c = sum(task_power(U, one_vs_rest(LABELS, c)) for c in (0, 1, 2)) / 3
        assert row["task_power_class_mean"] == pytest.approx(mean_c.tolist(), abs=1e-10)
        assert row["task_power_by_class_at_k"]["2"] == pytest.approx(float(task_power(U, one_vs_rest(LABELS, 2))[K - 1]))
    w8 = out["widths"][0]
    assert [p["seed"] for p in w8["same_seed"]] == [0, 1, 2]
    want = principal_cosines(eigh_desc(kernels[(8, 1)].float().double())[1][:, :K],
                             eigh_desc(kernels[(16, 1)].float().double())[1][:, :K])
    assert w8["same_seed"][1]["cosines"] == pytest.approx(want.tolist(), abs=1e-5)
    assert w8["same_seed_mean_cos2"] == pytest.approx(sum(p["mean_cos2"] for p in w8["same_seed"]) / 3)


def test_kernels_on_other_points_are_refused():
    Q = _basis()
    Kr = Q @ torch.diag(LAMBDA) @ Q.T
    other = NTKMember(16, 0, Kr.float(), Q[:, :K].float(), LABELS.flip(0), 0)
    with pytest.raises(ValueError, match="other probe points"):
        ntk_across_widths([_member(8, 0, Kr), other], ref_width=16)
    with pytest.raises(ValueError, match="reference width 32"):
        ntk_across_widths([_member(8, 0, Kr)], ref_width=32)
