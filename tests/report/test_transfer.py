"""Loss against learning rate: the sub-grid optimum, its drift across widths, diverged members."""
import json
import math

import numpy as np
import pytest
import yaml

from fastwidth.report.cli import make_report
from fastwidth.report.reader import load_run
from fastwidth.report.transfer import drift, lr_curves, optimum, transfer_lines

WIDTHS, SEEDS = [64, 128, 256, 512], [0, 1, 2]
LRS = [2.0 ** k for k in range(-16, -5)]


def fake_lr_run(path, exponent, noise=0.0, diverge_above=None, steps=50, arch="gpt"):
    """Loss = 1 + (log η - log η*_N)² with η*_N = 1e-3 (N/64)^exponent, plus seed noise."""
    path.mkdir(parents=True)
    cfg = {"model": {"arch": arch}, "param": {"kind": "mup" if exponent == 0 else "sp"},
           "sweep": {"widths": WIDTHS, "seeds": SEEDS, "lrs": LRS, "reference_width": 512}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rng = np.random.default_rng(0)
    rows = []
    for w in WIDTHS:
        star = 1e-3 * (w / 64) ** exponent
        for lr in LRS:
            for s in SEEDS:
                offset = noise * rng.standard_normal()
                for step in range(1, steps + 1):
                    if diverge_above and lr > diverge_above and step == 3:
                        rows.append({"kind": "diverged", "step": 3, "tokens": 30, "width": w, "seed": s,
                                     "base_lr": lr, "reason": "loss is nan"})
                        break
                    loss = 1 + (math.log(lr) - math.log(star)) ** 2 / (1 + step / 10) + offset
                    rows.append({"kind": "train", "step": step, "tokens": step * 10, "width": w, "seed": s,
                                 "base_lr": lr, "loss": loss})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_run(path)


def test_parabolic_optimum_is_exact_for_a_parabola_in_log_lr():
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    star = 7e-4
    losses = [(math.log(lr) - math.log(star)) ** 2 for lr in lrs]
    got, edge = optimum(lrs, losses)
    assert got == pytest.approx(star, rel=1e-9) and not edge
    got, edge = optimum(lrs, [5, 4, 3, 2, 1])          # minimum at the grid's edge
    assert got == 1e-2 and edge
    got, edge = optimum(lrs, [3, 2, 1, math.inf, math.inf])   # next to a diverged lr: the grid point
    assert got == 1e-3 and edge


@pytest.mark.parametrize("exponent", [0.0, -1.0, -0.5])
def test_drift_recovers_the_planted_slope(tmp_path, exponent):
    run = fake_lr_run(tmp_path / "r", exponent)
    fit = drift(run, 500)
    assert fit["slope"] == pytest.approx(exponent, abs=1e-6)
    assert fit["ci"][0] == pytest.approx(exponent, abs=1e-6) and fit["ci"][1] == pytest.approx(exponent, abs=1e-6)
    assert fit["optima"][64] == pytest.approx(1e-3, rel=1e-6)


def test_bootstrap_interval_widens_with_seed_noise_and_covers_the_slope(tmp_path):
    run = fake_lr_run(tmp_path / "r", -1.0, noise=0.3)
    fit = drift(run, 500)
    lo, hi = fit["ci"]
    assert lo < hi and lo <= -1.0 + 0.3 and hi >= -1.0 - 0.3


def test_diverged_members_are_never_the_optimum_and_count_as_inf(tmp_path):
    run = fake_lr_run(tmp_path / "r", -1.0, diverge_above=2.0 ** -8)
    curves = lr_curves(run, 500)
    assert all(v == math.inf for v in curves[64][2.0 ** -7].values())
    fit = drift(run, 500)
    assert all(lr <= 2.0 ** -8 for lr in fit["optima"].values())


@pytest.mark.slow  # trains an lr sweep and draws it (5 s)
def test_report_draws_loss_vs_lr_and_quotes_the_drift(tmp_path):
    fake_lr_run(tmp_path / "mup", 0.0, diverge_above=2.0 ** -8)
    fake_lr_run(tmp_path / "sp", -1.0, arch="mlp")
    summary = make_report([tmp_path / "mup", tmp_path / "sp"], tmp_path / "out").read_text()
    png = tmp_path / "out" / "loss_vs_lr.png"
    assert png.is_file() and png.stat().st_size > 20_000
    assert "Learning-rate transfer" in summary and "0.000 [" in summary and "-1.000" in summary
    assert "diverged and were stopped" in summary
    assert "| 500 tokens |" in summary and "| 500 examples |" in summary     # a classifier counts examples


def heldout_lr_run(path, steps=(10, 20, 30, 40), n_examples=64):
    """Eval rows and per-example probe losses in signatures: η*_N = 1e-3 at N = 64 (the base width)
    and 2e-3 above it, so all of the drift is the step 64 → 128."""
    from fastwidth.run import MemberSpec, RunDir
    from fastwidth.stats.signature import save_signature
    import torch
    path.mkdir(parents=True)
    cfg = {"model": {"arch": "mlp"}, "param": {"kind": "mup", "base_width": 64},
           "sweep": {"widths": WIDTHS, "seeds": SEEDS, "lrs": LRS, "reference_width": 512}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    difficulty = np.random.default_rng(1).standard_normal(n_examples)  # shared by members: cancels
    rows = []
    for w in WIDTHS:
        star = 1e-3 if w == 64 else 2e-3
        for lr in LRS:
            for s in SEEDS:
                for step in steps:
                    per = 1 + (math.log(lr) - math.log(star)) ** 2 + difficulty
                    rows.append({"kind": "eval", "step": step, "tokens": step * 10, "width": w, "seed": s,
                                 "base_lr": lr, "probe_loss": float(per.mean())})
                    save_signature(RunDir(path).signature(MemberSpec(w, lr, s).name, step),
                                   {"loss": torch.tensor(per, dtype=torch.float32)}, {})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_heldout_drift_reads_every_range_and_late_step(tmp_path):
    from fastwidth.report.transfer import late_drifts
    run = load_run(heldout_lr_run(tmp_path / "r"))
    fit = drift(run, 400)
    assert fit["source"] == "held-out probe" and fit["examples"] == 64 and fit["resampled"] == "seeds x examples"
    assert fit["optima"][64] == pytest.approx(1e-3, rel=1e-5) and fit["optima"][512] == pytest.approx(2e-3, rel=1e-5)
    assert fit["ranges"]["excl. base"]["widths"] == [128, 256, 512]
    assert fit["ranges"]["excl. base"]["slope"] == pytest.approx(0.0, abs=1e-5)
    assert [loc["slope"] for loc in fit["local"]] == pytest.approx([1.0, 0.0, 0.0], abs=1e-5)
    reads = late_drifts(run)
    assert [r["step"] for r in reads] == [20, 30, 40]                # the second half of the run
    summary = "\n".join(transfer_lines([run]))
    assert "without the base width" in summary and "64→128: +1.00" in summary and "| 40 |" in summary


@pytest.mark.slow
def test_report_draws_the_heldout_drift(tmp_path):
    summary = make_report([heldout_lr_run(tmp_path / "r")], tmp_path / "out").read_text()
    assert "without the base width" in summary and "64→128: +1.00" in summary and "| 40 |" in summary
    for name in ("loss_vs_lr.png", "transfer_drift.png"):
        assert (tmp_path / "out" / name).stat().st_size > 20_000
