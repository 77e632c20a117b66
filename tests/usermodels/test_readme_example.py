"""The README's "Your own model" example runs as written and ends with a report."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_example_is_about_thirty_lines_of_one_module_family():
    code = readme_example()
    assert len(code.strip().splitlines()) <= 40
    assert "fastwidth.train(" in code and "model=" in code


@pytest.mark.slow
def test_the_readme_example_trains_a_users_model_and_writes_the_report(tmp_path):
    (tmp_path / "example.py").write_text(readme_example())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "runs" / "your_model"
    summary = (run / "report" / "summary.md").read_text()
    assert "| your_model (mup) | mup |" in summary
    assert (run / "report" / "rmse_vs_width.png").exists() and (run / "report" / "preact_hist.png").exists()
    rows = (run / "metrics.jsonl").read_text()
    assert '"kind": "consistency"' in rows and '"width": 32' in rows
    assert "model.arch" not in res.stderr
