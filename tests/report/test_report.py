import json
import math

import numpy as np
import pytest
import torch
import yaml

from fastwidth.errors import UserError
from fastwidth.report.cli import make_report
from fastwidth.report.reader import late_mean, load_run
from fastwidth.report.summary import run_numbers
from fastwidth.run import RunDir
from fastwidth.stats.signature import save_signature

WIDTHS, SEEDS, STEPS = [32, 64, 128, 256], [0, 1], [0, 10, 20, 30, 40]


def fake_run(path, kind="mup", rmse_exp=-0.5, var_exp=-1.0, spread=0.0):
    """A run directory written by hand with known power laws, in the §5 contract."""
    path.mkdir(parents=True)
    cfg = {"param": {"kind": kind}, "sweep": {"widths": WIDTHS, "seeds": SEEDS, "reference_width": 256}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = []
    for step in STEPS:
        tok = step * 100
        for w in WIDTHS:
            for s in SEEDS:
                base = {"step": step, "tokens": tok, "width": w, "seed": s}
                rows.append({"kind": "train", **base, "loss": 3.0 - step / 50})
                rows.append({"kind": "eval", **base, "probe_loss": 3.0 - step / 50 + spread * math.log2(w),
                             "probe_acc": 0.5})
                if w != 256:
                    rows.append({"kind": "consistency", **base, "ref": "live", "ref_width": 256, "ref_seed": s,
                                 "true_logit_rmse": 2.0 * w ** rmse_exp, "true_logit_rmse_vs_mean": w ** rmse_exp,
                                 "cka": {"layer0": 1 - 1 / w, "layer1": 1 - 2 / w}, "loss_gap": 0.1 / w + 0.01 * s,
                                 "top1_agreement": 1 - 1 / w, "preact_w1": {"layer0": 1 / w, "layer1": None}})
                if step == STEPS[-1]:
                    rows.append({"kind": "sharpness", **base, "lr_sharpness": 1.5, "precond": "adam"})
                    ev = sorted(np.random.default_rng(w).random(6) * 10, reverse=True)
                    rows.append({"kind": "ntk", **base, "eigenvalues": ev, "task_power": list(np.linspace(0.2, 1, 6))})
                    h = torch.tensor(np.bincount(np.random.default_rng(w).integers(0, 16, 200), minlength=16),
                                     dtype=torch.float64)
                    save_signature(RunDir(path).signature(f"w{w}_s{s}", step), {"preact_hist/layer0": h,
                                   "preact/layer0": torch.zeros(7, dtype=torch.float64),
                                   "kernel/layer0": torch.eye(8) + 1 / w},
                                   {"hist_lo": -4.0, "hist_hi": 4.0})
            rows.append({"kind": "ensemble", "step": step, "tokens": tok, "width": w, "seed": -1, "n_seeds": 2,
                         "seed_variance": 3.0 * w ** var_exp, "bias": 0.1 * w ** -0.3 if w != 256 else 0.0,
                         "params": w * w, "ensemble_loss": [2.0 + 1 / w, 2.0 + 0.5 / w], "ensemble_acc": [0.5, 0.6],
                         "ensemble_loss_inf": 2.0, "ensemble_loss_c": 1 / w,
                         **({"bias_sq_debiased": 0.01 * w ** -0.6 - 0.0002, "bias_sq_debiased_ci": [-0.001, 0.01]}
                            if w != 256 else {})})
        rows.append({"kind": "fit", "step": step, "tokens": tok, "width": 0, "seed": -1, "ref_width": 256,
                     "rmse_slope": rmse_exp, "rmse_slope_ci": [rmse_exp - 0.1, rmse_exp + 0.1],
                     "variance_slope": var_exp, "variance_slope_ci": None, "bias_slope": -0.3,
                     "bias_slope_ci": [-0.5, -0.1], "n_boot": 1000})
    rows.append({"kind": "run", "step": STEPS[-1], "tokens": STEPS[-1] * 100, "width": 0, "seed": 0,
                 "wall_s": 1.0, "commit": "abc123"})
    with open(path / "metrics.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + '\n{"kind": "tra')   # a run still writing
    return path


@pytest.mark.slow  # draws every figure of the report (11 s of the fast tier); the sections draw theirs in their own fast tests
def test_report_recovers_known_slopes_and_draws_everything(tmp_path):
    mup = fake_run(tmp_path / "mup")
    sp = fake_run(tmp_path / "sp", kind="sp", rmse_exp=0.1, var_exp=0.2, spread=0.05)
    summary = make_report([mup, sp], tmp_path / "out")
    text = summary.read_text()
    for name in ("loss", "rmse_vs_tokens", "rmse_vs_width", "cka", "preact_hist", "sharpness",
                 "ensemble_variance", "ntk", "width_agreement", "decomposition", "ensemble_curves", "kernels"):
        png = tmp_path / "out" / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 10_000, name
        assert f"![{name}.png]" in text
    n = run_numbers(load_run(mup))
    assert n["rmse_slope"] == pytest.approx(-0.5) and n["variance_slope"] == pytest.approx(-1.0)
    assert n["bias_slope"] == pytest.approx(-0.3)
    assert n["rmse"][32] == pytest.approx(2.0 * 32 ** -0.5)
    assert n["loss_spread"] == pytest.approx(0.0, abs=1e-12)
    assert run_numbers(load_run(sp))["loss_spread"] == pytest.approx(0.05 * 3)
    assert "| mup | mup |" in text and "-0.500" in text and "+0.100" in text
    assert "-0.500 [-0.600, -0.400]" in text                          # the loop's fit with its interval
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert doc["run"]["commit"] == "abc123" and doc["run"]["data_source"] is None
    assert doc["fits"]["rmse_slope_ci"] == pytest.approx([-0.6, -0.4]) and doc["fits"]["variance_slope_ci"] is None
    w32 = next(r for r in doc["widths"] if r["width"] == 32)
    assert w32["true_logit_rmse"] == pytest.approx(2.0 * 32 ** -0.5) and w32["final_loss"] == pytest.approx(2.2)
    assert w32["bias_sq_debiased"] == pytest.approx(0.01 * 32 ** -0.6 - 0.0002)
    assert w32["loss_gap"] == pytest.approx(0.1 / 32 + 0.005)        # late mean over seeds
    # equal compute: 64² / 32² = 4 members, past the 2 measured -> from the fit 2 + (1/32)/4
    ec = next(r for r in doc["equal_compute"] if r["width"] == 32 and r["vs_width"] == 64)
    assert ec["members"] == 4 and ec["how"] == "fit" and ec["ensemble_loss"] == pytest.approx(2 + 1 / 128)
    assert [r["run"]["kind"] for r in doc["runs"]] == ["mup", "sp"]


def test_report_on_a_run_with_only_train_rows(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "tokens": 8, "width": 16,
                                                   "seed": 0, "loss": 2.0}) + "\n")
    text = make_report([run], tmp_path / "out").read_text()
    assert (tmp_path / "out" / "loss.png").is_file()
    assert "rmse_vs_width.png: not drawn" in text and not (tmp_path / "out" / "ntk.png").exists()


def test_not_a_run_dir(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        load_run(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"kind": "tr\n{"kind": "train"}\n')
    with pytest.raises(UserError, match="line 1"):
        load_run(bad)


def test_late_mean():
    assert late_mean([(0, 5.0), (50, 3.0), (80, 2.0), (100, 1.0)]) == pytest.approx(1.5)
    assert math.isnan(late_mean([]))


@pytest.mark.slow  # draws a whole report again (6 s): test_report_recovers_known_slopes_and_draws_everything stays fast
def test_cli_entry(tmp_path, capsys):
    from fastwidth.cli import main
    run = fake_run(tmp_path / "r")
    assert main(["report", str(run), "-o", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "summary.md").is_file()
    assert main(["report", str(tmp_path / "nope"), "-o", str(tmp_path / "o2")]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_report_reads_stored_entks_into_principal_angles(tmp_path):
    """Kernels whose top-3 eigenspace is the reference's with one direction turned by θ_N = 0.1·256/N:
    summary.json's fits.ntk carries cosines (1, 1, cos θ_N); the alignment figure is drawn."""
    from fastwidth.stats.ntk import eigh_desc
    run = fake_run(tmp_path / "mup")
    n, k = 12, 3
    Q = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    lam = torch.tensor([10.0, 8.0, 6.0, 4.0] + [0.5 / (i + 1) for i in range(n - 4)], dtype=torch.float64)
    labels = torch.arange(n) % 3
    for w in WIDTHS:
        t = 0.1 * 256 / w if w != 256 else 0.0
        R = Q.clone()
        R[:, 0], R[:, k] = math.cos(t) * Q[:, 0] + math.sin(t) * Q[:, k], -math.sin(t) * Q[:, 0] + math.cos(t) * Q[:, k]
        for s in SEEDS:
            K = R @ torch.diag(lam * (1 + 0.01 * s)) @ R.T
            ev, U = eigh_desc(K)
            save_signature(RunDir(run).ntk(f"w{w}_s{s}", STEPS[-1]),
                           {"kernel": K.float(), "eigenvectors": U[:, :k].float().contiguous(), "eigenvalues": ev,
                            "labels": labels},
                           {"step": STEPS[-1], "width": w, "seed": s, "name": f"w{w}_s{s}", "kernel": "lr",
                            "output": "class", "ntk_class": 0, "method": "exact", "points": n, "top_k": k})
    summary = make_report([run], tmp_path / "out")
    assert (tmp_path / "out" / "ntk_alignment.png").stat().st_size > 10_000
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert doc["fits"]["rmse_slope"] == pytest.approx(-0.5)          # the existing keys stay
    d = doc["fits"]["ntk"]
    assert d["step"] == STEPS[-1] and d["k"] == k and d["ref_width"] == 256 and d["kernel"] == "lr"
    for r in d["widths"]:
        if r["width"] == 256:
            assert r["reference"] and "same_seed" not in r
            continue
        want = [1.0, 1.0, math.cos(0.1 * 256 / r["width"])]
        assert r["ensemble_cosines"] == pytest.approx(want, abs=1e-5)
        assert r["halves_cosines"] == pytest.approx(want, abs=1e-5)
        assert [p["seed"] for p in r["same_seed"]] == SEEDS
        assert all(p["cosines"] == pytest.approx(want, abs=1e-5) for p in r["same_seed"])
        assert r["n_seeds"] == 2 and r["task_power"][-1] == pytest.approx(1.0)
    text = summary.read_text()
    assert "eNTK (lr kernel, class output, 12 points" in text
    # the reference width's seeds differ by a scale only: its same-width baseline is 1
    base = d["same_width_baseline"]
    assert (base["width"], base["half_a"], base["half_b"]) == (256, [0], [1])
    assert base["halves_mean_cos2"] == pytest.approx(1.0) and base["pairs_mean_cos2"] == pytest.approx(1.0, abs=1e-6)
    assert "| 256 (ref), other seeds: 1 seed pairs; mean kernels of seeds [0] vs [1] | 2 | 1.0000 | – | 1.0000 |" in text
