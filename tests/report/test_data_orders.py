"""A bias survives another data order or is not reported as one (report/data_orders.py)."""
import json

import yaml

from fastwidth.report.data_orders import data_order_groups, data_order_json, data_order_lines, verdict
from fastwidth.report.reader import load_run


def ens_run(path, data_seed, cis, kind="mup"):
    path.mkdir(parents=True)
    cfg = {"param": {"kind": kind}, "sweep": {"widths": [16, 32, 64]}, "data": {"seed": data_seed},
           "train": {"out_dir": str(path)}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"kind": "ensemble", "step": 50, "tokens": 500, "width": w, "seed": -1,
             "bias_sq_debiased": (ci[0] + ci[1]) / 2, "bias_sq_debiased_ci": ci} for w, ci in cis.items()]
    rows.append({"kind": "ensemble", "step": 50, "tokens": 500, "width": 64, "seed": -1, "seed_variance": 0.1})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_run(path)


def test_verdicts():
    assert verdict([[0.1, 0.3], [0.05, 0.2]]).startswith("bias")
    assert verdict([[0.1, 0.3], [-0.05, 0.2]]).startswith("not confirmed")
    assert verdict([[-0.1, 0.3], [-0.05, 0.2]]) == "none detected"
    assert verdict([[0.1, 0.3]]) == "one data order: bias in this order, not confirmed"


def test_runs_differing_only_in_data_order_are_compared(tmp_path):
    a = ens_run(tmp_path / "a", 0, {16: [0.2, 0.6], 32: [0.01, 0.3]})
    b = ens_run(tmp_path / "b", 1, {16: [0.1, 0.5], 32: [-0.1, 0.2]})
    other = ens_run(tmp_path / "c", 2, {16: [0.1, 0.5], 32: [-0.1, 0.2]}, kind="sp")   # another config
    groups = data_order_groups([a, b, other])
    assert [[r.path.name for r in g] for g in groups] == [["a", "b"]]
    text = "\n".join(data_order_lines([a, b, other]))
    assert "| 16 | 0.4 [0.2, 0.6] | 0.3 [0.1, 0.5] | bias (confirmed in every data order) |" in text
    assert "| 32 |" in text and "not confirmed" in text
    doc = data_order_json([a, b])
    assert doc[0]["widths"][1]["orders"][1] == {"data_seed": 1, "bias_sq_debiased": 0.05, "bias_sq_debiased_ci": [-0.1, 0.2]}
    assert data_order_groups([a, ens_run(tmp_path / "d", 0, {16: [0.1, 0.2]})]) == []   # same order twice
