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
from fastwidth.stats.signature import save_signature, signature_path

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
                                 "cka": {"layer0": 1 - 1 / w, "layer1": 1 - 2 / w}})
                if step == STEPS[-1]:
                    rows.append({"kind": "sharpness", **base, "lr_sharpness": 1.5, "precond": "adam"})
                    ev = sorted(np.random.default_rng(w).random(6) * 10, reverse=True)
                    rows.append({"kind": "ntk", **base, "eigenvalues": ev, "task_power": list(np.linspace(0.2, 1, 6))})
                    h = torch.tensor(np.bincount(np.random.default_rng(w).integers(0, 16, 200), minlength=16),
                                     dtype=torch.float64)
                    save_signature(signature_path(path, f"w{w}_s{s}", step), {"preact_hist/layer0": h,
                                   "preact/layer0": torch.zeros(7, dtype=torch.float64)},
                                   {"hist_lo": -4.0, "hist_hi": 4.0})
            rows.append({"kind": "ensemble", "step": step, "tokens": tok, "width": w, "seed": -1,
                         "seed_variance": 3.0 * w ** var_exp, "bias": 0.1 * w ** -0.3 if w != 256 else 0.0})
    with open(path / "metrics.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + '\n{"kind": "tra')   # a run still writing
    return path


def test_report_recovers_known_slopes_and_draws_everything(tmp_path):
    mup = fake_run(tmp_path / "mup")
    sp = fake_run(tmp_path / "sp", kind="sp", rmse_exp=0.1, var_exp=0.2, spread=0.05)
    summary = make_report([mup, sp], tmp_path / "out")
    text = summary.read_text()
    for name in ("loss", "rmse_vs_tokens", "rmse_vs_width", "cka", "preact_hist", "sharpness",
                 "ensemble_variance", "ntk"):
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


def test_cli_entry(tmp_path, capsys):
    from fastwidth.cli import main
    run = fake_run(tmp_path / "r")
    assert main(["report", str(run), "-o", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "summary.md").is_file()
    assert main(["report", str(tmp_path / "nope"), "-o", str(tmp_path / "o2")]) == 2
    assert "not a run directory" in capsys.readouterr().err
