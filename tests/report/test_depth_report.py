"""The report of a depth sweep, from rows written by hand in the format of DESIGN §5 (sweep.depths)."""
import json
import math

import numpy as np
import pytest
import yaml

from fastwidth.report.cli import make_report
from fastwidth.report.reader import load_run

WIDTHS, DEPTHS, SEEDS, STEPS, REF = [32, 64], [2, 4, 8], [0, 1, 2], [0, 10, 20], 8
LRS = [0.0025, 0.005, 0.01, 0.02, 0.04]


def rmse_depth(w, d, s, step):
    return (1.0 + 0.01 * s + 0.001 * step) * d ** -0.5 * 64 / w


def eta_star(d):
    return 0.02 * (d / 2) ** -0.5


def fake_depth_run(path, lrs=None):
    """A depth sweep's run directory: every per-member row with `depth`, consistency/ensemble/fit
    rows across width at each depth ("axis": "width") and across depth at each width ("axis": "depth")."""
    path.mkdir(parents=True)
    sweep = {"widths": WIDTHS, "depths": DEPTHS, "seeds": SEEDS, "reference_width": 64, "reference_depth": 0}
    if lrs:
        sweep["lrs"] = lrs
    (path / "config.yaml").write_text(yaml.safe_dump({"param": {"kind": "completep"}, "sweep": sweep}))
    rows = []
    for lr in lrs or [None]:
        extra = {} if lr is None else {"base_lr": lr}
        for step in STEPS:
            t = {"step": step, "tokens": step * 100, **extra}
            for w in WIDTHS:
                for d in DEPTHS:
                    for s in SEEDS:
                        m = {**t, "width": w, "depth": d, "seed": s}
                        # the probe loss: a parabola in log η around η*(d), the same at every width
                        loss = 2.0 + (math.log(lr / eta_star(d)) ** 2 if lr else 0.1 * d) + 0.001 * s
                        rows += [{"kind": "train", **m, "loss": loss}, {"kind": "eval", **m, "probe_loss": loss}]
                        if w != 64:
                            rows.append({"kind": "consistency", "axis": "width", "ref": "live", **m, "ref_width": 64,
                                         "ref_depth": d, "ref_seed": s, "true_logit_rmse": 1.0 * d + 0.01 * s})
                        if d != REF:
                            rows.append({"kind": "consistency", "axis": "depth", "ref": "live", **m, "ref_width": w,
                                         "ref_depth": REF, "ref_seed": s, "true_logit_rmse": rmse_depth(w, d, s, step),
                                         "cka": {"block0": 0.9 - 0.01 * s, "block1": 0.7}, "preact_w1": {"block1.mlp_fc": d / w}})
                    rows.append({"kind": "ensemble", "axis": "width", **t, "width": w, "depth": d, "seed": -1,
                                 "n_seeds": 3, "seed_variance": 5.0 * d / w, "bias": 0.0 if w == 64 else 0.1 * d})
                    rows.append({"kind": "ensemble", "axis": "depth", **t, "width": w, "depth": d, "ref_depth": REF,
                                 "ref_width": w, "seed": -1, "n_seeds": 3, "seed_variance": 3.0 / (d * w) + step,
                                 "seed_variance_ci": [1.0 / (d * w), 9.0 / (d * w)],
                                 "bias": 0.0 if d == REF else 0.2 * d ** -0.3,
                                 "bias_sq_debiased": None if d == REF else 0.03 * d ** -0.6,
                                 "bias_sq_debiased_ci": None if d == REF else [0.0, 0.06 * d ** -0.6]})
                rows.append({"kind": "fit", "axis": "depth", **t, "width": w, "depth": REF, "ref_depth": REF,
                             "ref_width": w, "seed": -1, "rmse_slope": -0.5 + w / 1000, "rmse_slope_ci": [-0.7, -0.3],
                             "variance_slope": -1.0 + step / 100, "variance_slope_ci": [-1.2, -0.8],
                             "bias_slope": -0.3, "bias_slope_ci": [-0.5, -0.1]})
            for d in DEPTHS:
                rows.append({"kind": "fit", "axis": "width", **t, "width": 0, "depth": d, "ref_depth": d,
                             "ref_width": 64, "seed": -1, "rmse_slope": -0.1 * d, "rmse_slope_ci": [-1, 1],
                             "variance_slope": -1.0, "bias_slope": -0.3})
    rows.append({"kind": "run", "step": 20, "tokens": 2000, "width": 0, "seed": 0, "wall_s": 1.0, "commit": "abc"})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def no_figures(monkeypatch):
    """Numbers only: drawing costs seconds (the figures are drawn in the slow test below)."""
    from fastwidth.report import cli, consistency_figures, depth
    for module in (cli, consistency_figures, depth):
        monkeypatch.setattr(module, "FIGURES", {})


def test_depth_sweep_summary_quotes_the_rows(tmp_path, no_figures):
    summary = make_report([fake_depth_run(tmp_path / "run")], tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    depth = doc["depth"]
    assert depth["reference_depth"] == REF and depth["depths"] == DEPTHS
    for w in depth["widths"]:
        assert w["fit"]["rmse_slope"] == -0.5 + w["width"] / 1000 and w["fit"]["rmse_slope_ci"] == [-0.7, -0.3]
        assert w["fit"]["variance_slope"] == -1.0 + 20 / 100 and w["fit"]["bias_slope_ci"] == [-0.5, -0.1]
        for r in w["depths"]:
            d = r["depth"]
            assert r["seed_variance"] == 3.0 / (d * w["width"]) + 20            # the final ensemble row's
            assert r["seed_variance_ci"] == [1.0 / (d * w["width"]), 9.0 / (d * w["width"])]
            assert r["reference"] == (d == REF)
            if d == REF:
                assert r["true_logit_rmse"] is None and r["bias"] == 0.0
                continue
            # late mean = the last evaluation here (the last 25% of tokens), the mean over seeds
            late = np.mean([rmse_depth(w["width"], d, s, 20) for s in SEEDS])
            assert math.isclose(r["true_logit_rmse"], late, rel_tol=1e-12)
            lo, hi = r["true_logit_rmse_ci"]
            assert lo <= late <= hi
            assert r["bias"] == 0.2 * d ** -0.3 and r["bias_sq_debiased_ci"] == [0.0, 0.06 * d ** -0.6]
            assert math.isclose(r["cka"], np.mean([(0.9 - 0.01 * s + 0.7) / 2 for s in SEEDS]), rel_tol=1e-12) and r["preact_w1"] == d / w["width"]
    # the width figures and numbers read the reference depth only
    (w32,) = [w for w in doc["widths"] if w["width"] == 32]
    assert math.isclose(w32["true_logit_rmse"], 1.0 * REF + 0.01, rel_tol=1e-12)
    assert w32["seed_variance"] == 5.0 * REF / 32 and doc["fits"]["rmse_slope"] == -0.1 * REF
    text = summary.read_text()
    assert "## Across depth" in text and "| 8 (ref) |" in text


def test_eta_star_against_depth_recovers_the_planted_drift(tmp_path, no_figures):
    make_report([fake_depth_run(tmp_path / "run", lrs=LRS)], tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    for fit in doc["depth"]["transfer"]:
        # a parabola in log η: its vertex is the planted optimum, η* ∝ L^-1/2
        for d in DEPTHS:
            assert math.isclose(fit["optima"][str(d)], eta_star(d), rel_tol=1e-9)
        assert math.isclose(fit["slope"], -0.5, abs_tol=1e-9)
        assert fit["ci"][0] - 1e-9 <= -0.5 <= fit["ci"][1] + 1e-9
        assert [x["depths"] for x in fit["local"]] == [[2, 4], [4, 8]]
    assert "## Learning-rate transfer across depth" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.slow  # four figures: seconds of matplotlib
def test_depth_sweep_report_draws_the_figures_against_depth(tmp_path, monkeypatch):
    from fastwidth.report import cli, consistency_figures
    monkeypatch.setattr(cli, "FIGURES", {})                   # the width figures: test_report.py
    monkeypatch.setattr(consistency_figures, "FIGURES", {})
    summary = make_report([fake_depth_run(tmp_path / "run", lrs=LRS)], tmp_path / "out")
    for name in ("consistency_depth", "variance_depth", "bias_depth", "transfer_depth"):
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 10_000, name
        assert f"![{name}.png]({name}.png)" in summary.read_text()


def test_a_run_without_depths_reports_as_before(tmp_path, no_figures):
    from test_report import fake_run
    run = load_run(fake_run(tmp_path / "plain"))
    assert run.depths == [] and run.ref_depth is None and run.all_rows == run.depth_rows
    make_report([tmp_path / "plain"], tmp_path / "out")
    assert not list((tmp_path / "out").glob("*depth*"))
    assert "depth" not in json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "depth" not in (tmp_path / "out" / "summary.md").read_text().lower()
