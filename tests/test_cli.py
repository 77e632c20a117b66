"""The console commands a user types (in-process through fastwidth.cli.main)."""
import json

import pytest

from fastwidth.cli import main

MLP = ["model.arch=mlp", "model.depth=3", "param.base_width=32", "data.source=synthetic", "data.in_dim=10"]


def test_mup_table_prints_rows_for_the_configured_width(capsys, tmp_path):
    assert main(["mup-table", "--set", *MLP, "model.width=128", "optim.name=adamw"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by = {r["name"]: r for r in rows}
    assert set(rows[0]) >= {"name", "shape", "role", "init_std", "lr_mult", "wd_mult", "forward_mult"}
    assert by["layers.1.weight"]["shape"] == [128, 128] and by["layers.1.weight"]["lr_mult"] == 0.25
    assert by["readout.weight"]["forward_mult"] == 0.25 and by["readout.weight"]["role"] == "output"
    assert main(["mup-table", "--format", "jsonl", "--set", *MLP, "model.width=64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(l)["name"] for l in lines] == [r["name"] for r in rows]


def test_mup_table_bad_key_is_one_line(capsys):
    assert main(["mup-table", "--set", *MLP, "param.kin=sp"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fastwidth: error: unknown config key 'param.kin' (did you mean 'param.kind'?)"


@pytest.mark.slow
def test_coord_check_command_writes_data_and_plot(tmp_path, capsys):
    out = tmp_path / "cc"
    assert main(["coord-check", "--set", *MLP, "--widths", "32,64,128", "--steps", "2", "--seeds", "1",
                 "-o", str(out)]) == 0
    data = json.loads((out / "coord_check.json").read_text())
    assert data["widths"] == [32, 64, 128] and "layers.1" in data["layers"]
    assert (out / "coord_check.png").stat().st_size > 10_000
    assert "update RMS max/min" in capsys.readouterr().out
