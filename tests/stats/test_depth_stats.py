"""Statistics across depth (stats/across_depth.py) against an offline computation on synthetic
signatures: every number below is recomputed here from its definition (numpy), not by the code
under test."""
import math

import numpy as np
import pytest
import torch

from fastwidth.run import RunDir
from fastwidth.stats import metrics as M
from fastwidth.stats.across_depth import DepthAxis, depth_rows, last_block_pairs, relative_depth_pairs
from fastwidth.stats.signature import save_signature

DEPTHS, SEEDS, REF, P, BINS = (2, 4, 8), (0, 1, 2), 8, 50, 12


def centers(layer, n):  # each layer its own bins: the W1 must compare them on the merged support
    shift = 0.1 * int("".join(c for c in layer.split(".")[0] if c.isdigit()) or 0)
    return np.linspace(-3, 3, n) + shift


def synthetic(depth: int, seed: int) -> dict:
    """A signature whose true logits have a depth bias 1/depth and seed noise of variance 0.04/depth."""
    g = torch.Generator().manual_seed(1000 * depth + seed)
    base = torch.linspace(-1, 1, P, dtype=torch.float64)
    sig = {"true_logit": base + 1.0 / depth + 0.2 / math.sqrt(depth) * torch.randn(P, generator=g, dtype=torch.float64),
           "sketch": torch.randn(P, 4, generator=g, dtype=torch.float64),
           "argmax": torch.randint(0, 3, (P,), generator=g), "loss": torch.rand(P, generator=g, dtype=torch.float64)}
    for i in range(depth):
        phi = torch.randn(10, 6, generator=g, dtype=torch.float64)
        sig[f"kernel/block{i}"] = phi @ phi.T
        for point in ("attn_q", "mlp_fc"):
            sig[f"preact_hist/block{i}.{point}"] = torch.rand(BINS, generator=g, dtype=torch.float64)
            sig[f"preact/block{i}.{point}"] = torch.tensor([100.0, 0.0, 0.5 + i, 0.0, 3.0, -1.0, 1.0], dtype=torch.float64)  # count, mean, var, ...
    return sig


@pytest.fixture(scope="module")
def sigs():
    return {(d, s): synthetic(d, s) for d in DEPTHS for s in SEEDS}


def test_layers_are_matched_by_relative_depth():
    deep = [f"block{i}" for i in range(8)] + ["stem"]
    # (i+1)/2 of 2 blocks against (j+1)/8: block0 (1/2) is block3 (4/8), block1 (2/2) block7
    assert relative_depth_pairs(["block0", "block1", "stem"], deep) == {"block0": "block3", "block1": "block7", "stem": "stem"}
    # shallower reference: block i of 8 at (i+1)/8 goes to the nearest of 1/2, 2/2; below 1/4 none
    assert relative_depth_pairs([f"block{i}" for i in range(8)], ["block0", "block1"]) == {
        "block1": "block0", "block2": "block0", "block3": "block0", "block4": "block0",
        "block5": "block1", "block6": "block1", "block7": "block1"}
    assert relative_depth_pairs(["block0", "block1", "block2"], [f"block{i}" for i in range(4)]) == {
        "block0": "block0", "block1": "block2", "block2": "block3"}  # 1/3·4 = 1.33 → 1, 2/3·4 = 2.67 → 3
    assert last_block_pairs(["block0.attn_q", "block1.attn_q", "block1.mlp_fc", "block0.mlp_fc"],
                            [f"block{i}.{p}" for i in range(8) for p in ("attn_q", "mlp_fc")]) == {
        "block1.attn_q": "block7.attn_q", "block1.mlp_fc": "block7.mlp_fc"}


def w1_by_quantiles(h1, c1, h2, c2, n=200001):
    """W1 = ∫|Q1(u) - Q2(u)| du on a fine grid of u: the quantile form, independent of the CDF form."""
    u = (np.arange(n) + 0.5) / n
    q = [np.asarray(c)[np.searchsorted(np.cumsum(h) / np.sum(h), u)] for h, c in ((h1, c1), (h2, c2))]
    return float(np.abs(q[0] - q[1]).mean())


def test_w1_on_two_grids():
    g = np.random.default_rng(0)
    h1, h2 = g.random(7), g.random(9)
    c1, c2 = np.sort(g.normal(size=7)), np.sort(g.normal(size=9) + 0.3)
    assert M.wasserstein1_points(h1, c1, h2, c2) == pytest.approx(w1_by_quantiles(h1, c1, h2, c2), abs=1e-4)
    same = np.linspace(-2, 2, 7)
    assert M.wasserstein1_points(h1, same, h2[:7], same) == pytest.approx(M.wasserstein1_binned(h1, h2[:7], same), abs=1e-12)


def slope(x, y):
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def test_depth_rows_equal_the_offline_statistics(sigs):
    rows = depth_rows(sigs, REF, centers, n_boot=100)
    true = {d: np.stack([sigs[(d, s)]["true_logit"].numpy() for s in SEEDS]) for d in DEPTHS}
    # consistency: every non-reference member against the reference depth's member of its seed
    cons = {(r["depth"], r["seed"]): r for r in rows if r["kind"] == "consistency"}
    assert set(cons) == {(d, s) for d in (2, 4) for s in SEEDS}
    for (d, s), r in cons.items():
        assert r["ref_depth"] == REF and r["ref_seed"] == s
        assert r["true_logit_rmse"] == pytest.approx(np.sqrt(np.mean((true[d][s] - true[REF][s]) ** 2)), rel=1e-12)
        assert r["true_logit_rmse_vs_mean"] == pytest.approx(np.sqrt(np.mean((true[d][s] - true[REF].mean(0)) ** 2)))
        j = {2: (3, 7), 4: (1, 3, 5, 7)}[d]   # block i of d ↔ block (i+1)·8/d − 1
        assert r["cka_ref_layer"] == {f"block{i}": f"block{k}" for i, k in enumerate(j)}
        for i, k in enumerate(j):
            a, b = (sigs[key][f"kernel/block{n}"].numpy() for key, n in (((d, s), i), ((REF, s), k)))
            h = np.eye(10) - 1 / 10
            ca, cb = h @ a @ h, h @ b @ h
            assert r["cka"][f"block{i}"] == pytest.approx((ca * cb).sum() / np.linalg.norm(ca) / np.linalg.norm(cb))
        last = d - 1
        assert set(r["preact_w1"]) == {f"block{last}.attn_q", f"block{last}.mlp_fc"}
        for p in ("attn_q", "mlp_fc"):
            h1, h2 = sigs[(d, s)][f"preact_hist/block{last}.{p}"], sigs[(REF, s)][f"preact_hist/block7.{p}"]
            want = w1_by_quantiles(h1.numpy(), centers(f"block{last}", BINS), h2.numpy(), centers("block7", BINS))
            assert r["preact_w1"][f"block{last}.{p}"] == pytest.approx(want, abs=1e-4)
            assert r["preact_w1_std"][f"block{last}.{p}"] == pytest.approx(r["preact_w1"][f"block{last}.{p}"] / math.sqrt(7.5))
    # ensembles: V_L unbiased over seeds, the debiased bias² and the per-depth mean RMSE
    ens = {r["depth"]: r for r in rows if r["kind"] == "ensemble"}
    var = {d: true[d].var(0, ddof=1).mean() for d in DEPTHS}
    for d in DEPTHS:
        assert ens[d]["seed_variance"] == pytest.approx(var[d], rel=1e-10) and ens[d]["ref_depth"] == REF
    for d in (2, 4):
        b2 = np.mean((true[d].mean(0) - true[REF].mean(0)) ** 2)
        assert ens[d]["bias_sq_debiased"] == pytest.approx(b2 - var[d] / 3 - var[REF] / 3, rel=1e-9)
        assert ens[d]["true_logit_rmse"] == pytest.approx(np.mean([cons[(d, s)]["true_logit_rmse"] for s in SEEDS]))
    # the fit: slopes of log quantity on log depth, with intervals from the bootstrap over seeds
    (fit,) = [r for r in rows if r["kind"] == "fit"]
    assert fit["variance_slope"] == pytest.approx(slope(DEPTHS, [var[d] for d in DEPTHS]), rel=1e-9)
    assert fit["rmse_slope"] == pytest.approx(slope((2, 4), [ens[d]["true_logit_rmse"] for d in (2, 4)]), rel=1e-9)
    assert fit["rmse_depths"] == [2, 4] and fit["depth"] == 0 and fit["ref_depth"] == REF
    lo, hi = fit["variance_slope_ci"]
    assert lo < fit["variance_slope"] < hi
    # log p_y = -loss: the same estimator (these signatures hold no logits: no centered output)
    logp = {d: -np.stack([sigs[(d, s)]["loss"].numpy() for s in SEEDS]) for d in DEPTHS}
    for d in DEPTHS:
        assert ens[d]["seed_variance_logp"] == pytest.approx(logp[d].var(0, ddof=1).mean(), rel=1e-6)
        assert "seed_variance_centered" not in ens[d]
    assert fit["variance_slope_logp"] == pytest.approx(
        slope(DEPTHS, [logp[d].var(0, ddof=1).mean() for d in DEPTHS]), rel=1e-6)


class Writer:
    def __init__(self):
        self.rows = []

    def write(self, row):
        self.rows.append(row)


class Spec:
    def __init__(self, depth, seed):
        self.width, self.depth, self.seed, self.name = 32, depth, seed, f"w32_d{depth}_s{seed}"


def test_depth_axis_writes_once_every_signature_is_there(tmp_path, sigs):
    """Sequential sweeps: the rows of a step come when the last depth's member has evaluated it,
    and equal depth_rows on the same signatures."""
    members = [Spec(d, s) for d in DEPTHS for s in SEEDS]
    writer = Writer()
    axis = DepthAxis(members, REF, tmp_path, writer, centers, n_boot=0)
    for i, m in enumerate(members):
        assert not writer.rows
        save_signature(RunDir(tmp_path).signature(m.name, 10), sigs[(m.depth, m.seed)], {})
        axis.evaluated(10, 640)
    want = depth_rows(sigs, REF, centers, n_boot=0)
    assert len(writer.rows) == len(want)
    for got, exp in zip(writer.rows, want):
        assert got["axis"] == "depth" and got["width"] == got["ref_width"] == 32 and got["step"] == 10
        assert got["kind"] == exp["kind"] and got.get("true_logit_rmse") == pytest.approx(exp.get("true_logit_rmse"), nan_ok=True)
    axis.evaluated(10, 640)
    assert len(writer.rows) == len(want)   # once per step
