"""The lines a run prints at its end, from report/summary.json (the agreed schema)."""
import json

import pytest

from fastwidth.report.headline import headline_lines, print_headline

SUMMARY = {
    "run": {"optimizer": "adamw", "lr": 0.003, "data_source": "stdlib", "commit": "abc123", "reference_width": 512},
    "widths": [{"width": 64, "final_loss": 2.5, "true_logit_rmse": 0.21},
               {"width": 32, "final_loss": 2.75, "true_logit_rmse": 0.274},
               {"width": 512, "final_loss": 2.25, "true_logit_rmse": None}],
    "fits": {"rmse_slope": -0.47, "rmse_slope_ci": [-0.52, -0.41], "variance_slope": -1.02,
             "variance_slope_ci": [-1.2, -0.9], "bias_slope": -0.3},
}


def test_headline_gives_each_width_and_each_fit_with_its_interval():
    lines = headline_lines(SUMMARY, "runs/demo")
    assert lines[0] == "run runs/demo (optimizer adamw, lr 0.003, data_source stdlib)"
    assert "true-logit RMSE vs 512" in lines[1]
    assert [l.split()[:3] for l in lines[2:5]] == [["32", "2.75", "0.274"], ["64", "2.5", "0.21"],
                                                   ["512", "2.25", "n/a"]]
    assert "slope -0.470 [-0.520, -0.410]" in lines[5] and lines[5].strip().startswith("true-logit RMSE")
    assert "slope -1.020 [-1.200, -0.900]" in lines[6]
    assert lines[7].strip() == "ensemble bias vs width slope -0.300"  # no interval given: none printed


def test_headline_tolerates_missing_keys(tmp_path, capsys):
    assert headline_lines({}, None) == ["run"]
    assert headline_lines({"widths": [{"width": 8}], "fits": {"rmse_slope": float("nan")}}, "r")[1:] == [
        f"  {'width':>7}  {'final loss':>10}  {'true-logit RMSE vs ref':>24}",
        f"  {8:>7}  {'n/a':>10}  {'n/a':>24}",
        "  true-logit RMSE vs width slope n/a  (the paper's late-time slope is about -0.5)"]
    assert print_headline(tmp_path) == []  # not a run, no report/summary.json: nothing printed, no error
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "summary.json").write_text(json.dumps(SUMMARY))
    assert print_headline(tmp_path) == capsys.readouterr().out.strip().splitlines()


@pytest.mark.slow  # trains a 4-member sweep (8 s); test_train checks the run directory holds report/
def test_a_run_ends_with_its_report_and_headline(tmp_path, capsys):
    from fastwidth.api import train as run  # the entry that adds the report (loop.run leaves it to api)
    from fastwidth.config import load_config
    run_dir = run(load_config(None, [
        "model.arch=mlp", "model.depth=2", "param.base_width=16", "data.source=synthetic", "data.batch_size=8",
        "data.in_dim=6", "data.num_classes=3", "data.probe_size=16", "sweep.widths=[16,32]", "sweep.seeds=[0,1]",
        "train.progress=false", "train.steps=6", "stats.every=3", f"train.out_dir={tmp_path / 'run'}"]))
    out = capsys.readouterr().out
    assert (run_dir / "report" / "summary.md").is_file()
    assert (run_dir / "report" / "rmse_vs_tokens.png").stat().st_size > 5_000
    assert f"report: {run_dir / 'report' / 'summary.md'}" in out
    assert f"run {run_dir}" in out and "true-logit RMSE vs 32" in out  # the headline
    assert [l.split()[0] for l in out.splitlines() if l.strip().split(" ")[0] in ("16", "32")] == ["16", "32"]
    off = run(load_config(None, ["model.arch=mlp", "data.source=synthetic", "train.steps=2", "train.progress=false",
                                 "train.report=false", f"train.out_dir={tmp_path / 'off'}"]))
    assert list((off / "report").iterdir()) == []
