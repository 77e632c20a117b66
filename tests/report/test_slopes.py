"""Width slopes over training (report/slopes.py): where V_N stops scaling like 1/N, on fit rows written by hand."""
import json

import pytest
import yaml

from fastwidth.report.reader import load_run
from fastwidth.report.slopes import one_over_n, slope_lines, slopes_over_training


def fit_run(path, var_cis, kind="mup"):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"param": {"kind": kind}, "sweep": {"widths": [16, 32, 64]}}))
    rows = []
    for i, ci in enumerate(var_cis):
        step = 10 * (i + 1)
        mid = None if ci is None else (ci[0] + ci[1]) / 2
        rows.append({"kind": "fit", "step": step, "tokens": step * 100, "width": 0, "seed": -1,
                     "variance_slope": mid, "variance_slope_ci": ci, "rmse_slope": -0.5, "rmse_slope_ci": [-0.6, -0.4],
                     "bias_beta_sq": 0.5, "bias_beta_sq_ci": [-1.0, 2.0]})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_run(path)


def test_where_variance_stops_scaling_like_one_over_n(tmp_path):
    run = fit_run(tmp_path / "a", [[-1.2, -0.8], [-1.1, -0.7], [-0.8, -0.4], [-1.1, -0.9], [-0.7, -0.3], [-0.5, -0.1]])
    got = one_over_n(run)
    assert not got["holds"] and got["from_step"] == 50 and got["from_tokens"] == 5000
    assert got["covering_steps"] == [10, 20, 40] and got["slope_then"] == pytest.approx(-0.5)
    assert "stops scaling like 1/N at step 50" in "\n".join(slope_lines([run]))
    held = one_over_n(fit_run(tmp_path / "b", [[-0.8, -0.4], [-1.2, -0.9]]))
    assert held["holds"] and held["from_step"] is None
    never = fit_run(tmp_path / "c", [[-0.8, -0.4], [-0.6, -0.2]])
    assert one_over_n(never)["covering_steps"] == [] and "never scales like 1/N" in slope_lines([never])[2]
    assert one_over_n(fit_run(tmp_path / "d", [None, None])) is None   # fewer than 3 seeds: no intervals


def test_slopes_figure_draws_mup_beside_sp(tmp_path):
    mup = fit_run(tmp_path / "mup", [[-1.2, -0.8], [-1.1, -0.7], [-0.8, -0.4]])
    sp = fit_run(tmp_path / "sp", [[-0.4, -0.1], [-0.3, 0.0], [-0.3, 0.1]], kind="sp")
    assert slopes_over_training([mup, sp], tmp_path / "s.png").stat().st_size > 20_000
    assert slopes_over_training([fit_run(tmp_path / "e", [[-1, -0.5]])], tmp_path / "e.png") is None
