"""docs/results.md regeneration (report/results.py): the blocks it rewrites and its command line."""
import pytest

from fastwidth.report.results import SECTIONS, main, write_block


def test_write_block_replaces_its_markers_and_keeps_the_prose(tmp_path):
    doc = tmp_path / "results.md"
    sec = next(s for s in SECTIONS if s.name == "complexity")
    doc.write_text("# Results\n\nhand-written prose\n")
    write_block(doc, sec, ["first"])
    assert "## Bias against the task's complexity" in doc.read_text()
    doc.write_text(doc.read_text() + "\nmore prose after\n")
    write_block(doc, sec, ["second", "block"])
    text = doc.read_text()
    assert "first" not in text and "second\nblock" in text and text.count("results:complexity:start") == 1
    assert "hand-written prose" in text and "more prose after" in text


def test_every_section_names_existing_configs_and_bad_names_exit_2(capsys):
    from pathlib import Path
    for s in SECTIONS:
        for _, cfg, _ in s.runs:
            assert Path(cfg).is_file(), cfg
    assert main(["--list"]) == 0 and "complexity:" in capsys.readouterr().out
    assert main(["--only", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown section" in err


@pytest.mark.slow
def test_a_section_regenerates_from_finished_runs(tmp_path):
    import json
    from fastwidth.report.results import Section, run_section
    sec = Section("tiny", "tiny", (("mlp", "configs/complexity/teacher_student.yaml",
                                    ("train.threads=1", "train.steps=4", "stats.every=2", "sweep.widths=[32,64]",
                                     "sweep.seeds=[0,1,2]", "sweep.reference_width=64")),))
    block = run_section(sec, tmp_path / "runs", tmp_path / "docs", reuse=True)
    assert any("# " in line and " s" in line for line in block) and "| mlp (mup) | 32 |" in "\n".join(block)
    doc = json.loads((tmp_path / "docs" / "results" / "tiny" / "summary.json").read_text())
    assert doc["widths"][0]["true_logit_rmse_ci"] is not None


def test_width_table_leaves_out_runs_without_probe_evaluations(tmp_path):
    import json
    from fastwidth.report.results import _width_table
    empty = {"width": 64, "reference": False, "true_logit_rmse": None, "seed_variance": None}
    full = {"width": 128, "reference": True, "true_logit_rmse": 0.5, "seed_variance": 0.1, "bias_sq_debiased": None}
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"runs": [{"run": {"label": "gd"}, "widths": [empty]}]}))
    assert _width_table(p) == []                                  # a sharpness-only run: no table of dashes
    p.write_text(json.dumps({"runs": [{"run": {"label": "ok"}, "widths": [empty, full]}]}))
    table = _width_table(p)
    assert len(table) == 4 and table[2].startswith("| ok | 128 (ref) | 0.5 |")


def test_the_block_prints_no_machine_path(tmp_path, monkeypatch):
    from pathlib import Path
    from fastwidth.report.results import shown
    monkeypatch.chdir(tmp_path)
    runs = Path("/elsewhere/runs")
    assert shown(runs / "offline" / "online", runs) == "$RUNS/offline/online"          # outside the cwd
    assert shown(tmp_path / "runs" / "x" / "y", tmp_path / "runs") == "runs/x/y"      # inside it: relative
    assert shown(Path("runs/results/x/y"), Path("runs/results")) == "runs/results/x/y"  # relative: as given
