"""bench/gpu_bench.py's CPU-side logic: budget, subprocess runner, report and CSV schema, and one
--dry-run of a timing family end to end (the Triton interpreter stands in for the GPU)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench import gpu_bench as G  # noqa: E402


def test_plan_fits_eight_minutes():
    assert sum(G.PLAN.values()) + G.SPARE_S <= G.BUDGET_S <= 480


def test_budget_cuts_each_part_to_what_is_left():
    now = [0.0]
    b = G.Budget(480, clock=lambda: now[0])
    assert b.deadline("tests") == G.PLAN["tests"]
    now[0] = 400.0
    assert b.deadline("attention") == pytest.approx(480 - 400 - G.SPARE_S)
    now[0] = 470.0
    assert b.deadline("act") == 0.0
    assert G.Budget(480, scale=4.0).deadline("act") == G.PLAN["act"] * 4


def test_run_part_reports_timeout_and_exit_code():
    code, secs, last = G.run_part([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    assert code is None and last == "timed out" and secs < 20
    code, _, last = G.run_part([sys.executable, "-c", "print('hello'); raise SystemExit(3)"], timeout=60)
    assert code == 3 and last == "hello"


def _rows():
    base = dict(case="attention", shape="T2048", unit="TFLOP/s", baseline="sdpa_flash", fast="triton", note="",
                targets=[("speed", "sdpa_flash", ">=", 0.9)])
    return [dict(base, impl="triton", ms=2.0, rate=300.0, peak_mib=10.0),
            dict(base, impl="sdpa_flash", ms=1.6, rate=375.0, peak_mib=12.0),
            dict(case="readout_ce", shape="V50257", impl="liger", error="ImportError: no module")]


def test_targets_are_ratios_of_the_same_run():
    lines = G.target_lines(_rows())
    assert lines == ["| attention speed vs sdpa_flash >= 0.9 | T2048 | 0.80x | FAIL |"]


def test_csv_rows_have_results_csv_columns(tmp_path):
    header = (ROOT / "bench" / "results.csv").read_text().splitlines()[0].split(",")
    assert header == G.CSV_FIELDS
    env = dict(gpu="NVIDIA H200", torch="2.11", triton="3.6.0")
    rows = G.csv_rows(_rows(), env, "2026-12-01T00:00:00Z", "abc")
    assert all(set(r) == set(G.CSV_FIELDS) for r in rows)
    tri = next(r for r in rows if r["metric"].startswith("TFLOP/s triton"))
    assert tri["value"] == 300.0 and tri["baseline"] == 375.0 and tri["ratio"] == 0.8
    budget = G.Budget(480)
    budget.record("attention", 12.0, "ok")
    G.write_report(tmp_path, _rows(), env, [], budget)
    with (tmp_path / "gpu_results.csv").open() as f:
        assert next(csv.reader(f)) == G.CSV_FIELDS
    md = (tmp_path / "gpu_results.md").read_text()
    assert "| attention | 12 | ok |" in md and "liger: ImportError" in md
    # each row beside its baseline of the same run: sdpa_flash 1.6 ms / triton 2.0 ms
    assert "| attention | T2048 | triton | 2.000 | 300.0 TFLOP/s | 10 | sdpa_flash | 1.600 | 0.80x |  |" in md


def test_gpt_step_rows_show_mfu():
    r = dict(case="gpt_step", shape="w2048", impl="triton", ms=100.0, rate=494.5, unit="TFLOP/s", peak_mib=0.0,
             baseline="eager", fast="triton", targets=[], note="")
    lines = G.table_lines([r, dict(r, impl="eager", ms=200.0, rate=247.25)], 989e12)
    assert lines[2].endswith("| eager | 200.000 | 2.00x | 50.0% |")


def test_child_past_its_deadline_writes_what_it_has(tmp_path):
    # a deadline already spent: every impl is a note row, and the rows file is still written
    assert G.run_child("act", tmp_path, dry=True, deadline_s=0.0) == 0
    import json
    rows = json.loads((tmp_path / "rows_act.json").read_text())
    assert rows and all(r["error"] == "skipped: part deadline" for r in rows)


def test_bad_family_exits_2():
    assert G.main(["--out", "unused", "--only", "attn"]) == 2


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    # every part (the GPU tests, which skip without CUDA, and each timing family) on the CPU,
    # interpreted at tiny shapes: the real run's orchestration, minus the GPU
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--out", str(tmp_path), "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "budget" in p.stdout
    for part in G.PLAN:
        assert f"[{part}] " in p.stdout
        if part != "tests":
            assert f"[{part}] ok" in p.stdout, p.stdout[-3000:]
    rows = list(csv.DictReader((tmp_path / "gpu_results.csv").open()))
    assert {r["bench"] for r in rows} == {"gpu_attention", "gpu_readout_ce", "gpu_rms_norm", "gpu_layer_norm",
                                          "gpu_gelu", "gpu_swiglu", "gpu_gpt_step", "gpu_linear_gelu"}
    assert any(r["metric"].startswith("GB/s triton") for r in rows)
    md = (tmp_path / "gpu_results.md").read_text()
    assert "| baseline | baseline ms | speed-up | MFU |" in md and "| gpt_step |" in md
