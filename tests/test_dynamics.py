"""Full-batch gradient descent, MSE, learning rates in units of 2/λ0, sharpness trajectories."""
import math

import pytest
import torch

from fastwidth.report.cli import make_report
from fastwidth.trainer.dynamics import mse_loss
from fastwidth.trainer.loop import run
from fastwidth.run.metrics import read_metrics
from test_train import TINY_MLP, cfg_of

GD = ["train.full_batch=true", "train.loss=mse", "optim.name=sgd", "optim.grad_clip=0", "optim.lr_unit=edge",
      "data.batch_size=32", "stats.batch_sharpness_every=5", "stats.sharpness_iters=0", "stats.ntk_points=0",
      "train.diverge_factor=0", "sweep.seeds=[0]"]


def test_mse_loss_closed_form():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([1, 2])
    # 0.5 * ((1 + 1 + 0) + (0 + 0 + 1)) / 2
    assert float(mse_loss(logits, y)) == pytest.approx(0.75)


def test_full_batch_trains_on_one_fixed_batch(tmp_path):
    d = run(cfg_of(tmp_path, TINY_MLP, "train.steps=6", "train.full_batch=true", "sweep.widths=[16]",
                   "optim.name=sgd", "optim.lr=0.1", "optim.grad_clip=0", "data.batch_size=16"))
    losses = [r["loss"] for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "train"]
    # gradient descent on one batch with a small step: the loss falls every step
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.slow  # a whole training run (several s): the second tier keeps the fast one under 5 minutes
def test_edge_units_and_sharpness_trajectories(tmp_path):
    d = run(cfg_of(tmp_path, TINY_MLP, "train.steps=30", "sweep.lrs=[0.5, 1.5]", *GD))
    rows = read_metrics(d / "metrics.jsonl")
    lam0 = {(r["width"], r["base_lr"]): r for r in rows if r["kind"] == "lambda0"}
    assert len(lam0) == 4
    for (w, c), r in lam0.items():       # η = c · 2/λ0, and the step-0 sharpness is λ0 itself
        assert r["lr"] == pytest.approx(c * 2 / r["lambda0"], rel=1e-9)
        s0 = next(x for x in rows if x["kind"] == "batch_sharpness" and x["step"] == 0 and x["width"] == w
                  and x["base_lr"] == c)
        assert s0["sharpness"] == pytest.approx(r["lambda0"], rel=1e-3)
        assert s0["edge"] == pytest.approx(2 / r["lr"], rel=1e-9) and s0["batch"] == "full"
    traj = {}
    for r in rows:
        if r["kind"] == "batch_sharpness":
            traj.setdefault((r["width"], r["base_lr"]), []).append((r["step"], r["sharpness"] / r["edge"]))
    assert all(sorted(s for s, _ in t) == [0, 5, 10, 15, 20, 25, 30] for t in traj.values())
    for w in (16, 32):
        stable = dict(traj[(w, 0.5)])
        assert stable[0] == pytest.approx(0.5, rel=1e-3) and stable[30] > stable[0]   # progressive sharpening
        unstable = dict(traj[(w, 1.5)])
        assert unstable[0] == pytest.approx(1.5, rel=1e-3) and min(unstable.values()) < 1.0   # catapult: below the edge
    out = tmp_path / "report"
    make_report([d], out)
    assert (out / "edge_of_stability.png").stat().st_size > 20_000


def test_online_adam_gets_sharpness_on_the_training_batch(tmp_path):
    d = run(cfg_of(tmp_path, TINY_MLP, "train.steps=4", "stats.batch_sharpness_every=2", "stats.sharpness_iters=0",
                   "stats.ntk_points=0", "sweep.widths=[16]"))
    rows = [r for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "batch_sharpness"]
    assert [r["step"] for r in rows] == [0, 2, 4] and all(r["batch"] == "online" for r in rows)
    assert rows[0]["precond"] == "lr" and rows[-1]["precond"] == "adam"
    assert rows[-1]["edge"] == pytest.approx((2 + 2 * 0.9) / (1 - 0.9) / rows[-1]["eta"])
    assert all(math.isfinite(r["sharpness"]) for r in rows)


def test_loop_sharpness_rows_are_the_dynamics_path_on_the_same_batch(tmp_path):
    """One procedure: at every evaluation the loop's sharpness row (the Monitor) and the
    batch_sharpness row (stats/training_rows.py) are the same computation on the training batch of the
    step just taken (the first batch at step 0), so they agree to the last bit; at step 0 its loss
    is the first training step's loss (the same batch and parameters; fused vs unfused readout)."""
    d = run(cfg_of(tmp_path, TINY_MLP, "train.steps=4", "stats.every=2", "stats.sharpness_every=2",
                   "stats.batch_sharpness_every=2", "stats.sharpness_points=8", "stats.ntk_points=0",
                   "sweep.widths=[16]", "sweep.seeds=[0]"))
    rows = read_metrics(d / "metrics.jsonl")
    loop = {r["step"]: r for r in rows if r["kind"] == "sharpness"}
    dyn = {r["step"]: r for r in rows if r["kind"] == "batch_sharpness"}
    assert sorted(loop) == sorted(dyn) == [0, 2, 4]
    for step, a in loop.items():
        b = dyn[step]
        assert a["batch"] == "train" and a["batch_step"] == b["batch_step"] == max(step - 1, 0)
        assert a["batch_examples"] == b["batch_examples"] == 8
        for key in ("precond_sharpness", "lr_sharpness", "threshold", "precond", "batch_loss", "iters", "converged",
                    "residual"):
            assert a[key] == b[key], (step, key)
        assert a["converged"] == (a["residual"] <= 1e-2) and a["iters"] <= 20
    first = next(r for r in rows if r["kind"] == "train" and r["step"] == 1)
    assert loop[0]["batch_loss"] == pytest.approx(first["loss"], rel=1e-5)


def test_sharpness_due_is_dense_then_every_k():
    from fastwidth.stats.training_rows import sharpness_due
    due = [s for s in range(21) if sharpness_due(s, every=4, dense=6, steps=21)]
    assert due == [0, 1, 2, 3, 4, 5, 6, 8, 12, 16, 20]
    assert [s for s in range(8) if sharpness_due(s, every=0, dense=3, steps=7)] == [0, 1, 2, 3]
    assert not any(sharpness_due(s, every=0, dense=0, steps=7) for s in range(8))
    assert [s for s in range(8) if sharpness_due(s, every=5, dense=0, steps=7)] == [0, 5, 7]  # and the last step


def test_dense_batch_sharpness_rows_every_step_then_every_k(tmp_path):
    d = run(cfg_of(tmp_path, TINY_MLP, "train.steps=7", "stats.batch_sharpness_every=3", "stats.batch_sharpness_dense=2",
                   "stats.batch_sharpness_iters=3", "stats.sharpness_iters=0", "stats.ntk_points=0",
                   "sweep.widths=[16]", "sweep.seeds=[0]"))
    rows = [r for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "batch_sharpness"]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 6, 7]
