"""The complexity sweep's grouping, table and figure (report/complexity.py) on runs written by hand."""
import json

import yaml

from fastwidth.report.complexity import complexity_figure, complexity_table, groups
from fastwidth.report.reader import load_run

BASE = {"teacher_width": 64, "num_classes": 10, "in_dim": 32, "label_noise": 0.0}


def cx_run(path, b2_scale, **data):
    path.mkdir(parents=True)
    cfg = {"data": {**BASE, **data}, "param": {"kind": "mup"}, "sweep": {"widths": [32, 64, 128], "reference_width": 128}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"kind": "eval", "step": 10, "tokens": 640, "width": 128, "seed": s, "probe_acc": 0.5 + 0.1 * s}
            for s in (0, 1)]
    for w in (32, 64, 128):
        row = {"kind": "ensemble", "step": 10, "tokens": 640, "width": w, "seed": -1, "seed_variance": 1.0 / w}
        if w != 128:
            b2 = b2_scale * 32 / w
            row.update(bias_sq_debiased=b2, bias_sq_debiased_ci=[b2 - 0.01, b2 + 0.01])
        rows.append(row)
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_run(path)


def test_runs_group_by_the_one_knob_they_change(tmp_path):
    runs = [cx_run(tmp_path / "base", 0.1), cx_run(tmp_path / "t16", 0.05, teacher_width=16),
            cx_run(tmp_path / "t256", 0.2, teacher_width=256), cx_run(tmp_path / "c2", 0.3, num_classes=2),
            cx_run(tmp_path / "two", 0.9, num_classes=2, in_dim=8)]             # two knobs changed: in no panel
    base, by_knob = groups(runs)
    assert base == BASE
    assert [v for v, _ in by_knob["teacher_width"]] == [16, 64, 256]
    assert [v for v, _ in by_knob["num_classes"]] == [2, 10] and "in_dim" not in by_knob
    table = "\n".join(complexity_table(runs))
    assert "| teacher_width = 256 | 0.2 [0.19, 0.21] | 0.1 [0.09, 0.11] |" in table
    assert "| num_classes = 10 (base) | 0.1 [0.09, 0.11]" in table and "0.550" in table   # mean ref accuracy
    assert complexity_figure(runs, tmp_path / "c.png").stat().st_size > 20_000
    assert complexity_figure(runs[:1], tmp_path / "none.png") is None
