"""report/outputs.py: V_N of three outputs from a run's signatures, on a planted per-seed logit shift."""
import json
import math
import sys
from pathlib import Path

import torch

from fastwidth.report import outputs
from fastwidth.report.reader import Run
from fastwidth.run import MemberSpec
from fastwidth.stats.signature import save_signature

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stats"))
from stats_toys import SEEDS, WIDTHS, shifted_logit_family as family  # noqa: E402


def _run(tmp_path, steps=(10, 20, 30), **kw) -> Run:
    rows, sigs = [], {}
    for step in steps:
        for w, ss in family(seed=step, **kw).items():
            rows.append({"kind": "ensemble", "step": step, "tokens": 100 * step, "width": w, "seed": -1})
            for s, sig in zip(SEEDS, ss):
                name = MemberSpec(w, None, s).name
                path = tmp_path / "signatures" / name / f"step_{step:08d}.safetensors"
                save_signature(path, {k: v.contiguous() for k, v in sig.items()}, {})
                sigs.setdefault(name, {})[step] = path
                rows.append({"kind": "eval", "step": step, "tokens": 100 * step, "width": w, "seed": s})
    config = {"sweep": {"widths": list(WIDTHS)}, "stats": {"bootstrap": 200}, "param": {"kind": "mup"}}
    return Run(tmp_path / "toy_mup", config, rows, sigs)


def test_shifted_logits_flatten_only_the_raw_slope_and_the_report_says_so(tmp_path):
    run = _run(tmp_path, shift=0.3, var_scale=0.2)
    doc = outputs.outputs_numbers(run)
    assert doc["final_step"] == 30 and doc["late_steps"] == [30]            # tokens >= 0.75 * 3000
    raw, cen, logp = (doc["final"][s] for s in ("", "_centered", "_logp"))
    assert raw["slope"] > -0.3 and raw["ci"][1] > -0.5                        # the shift's variance: flat
    for o in (cen, logp):
        assert abs(o["slope"] + 1) < 0.1 and o["ci"][0] < -1 < o["ci"][1]
    assert doc["late"][""]["slope"] == raw["slope"]                          # one late step: the final one
    lines = outputs.summary_lines([run])
    assert lines[0].startswith("## V_N for three outputs") and sum("| toy_mup" in line for line in lines) == 3
    js = outputs.summary_json([run])["toy_mup"]
    assert math.isclose(js["centered"]["final"]["slope"], cen["slope"]) and json.dumps(js)
    assert outputs.draw_outputs([run], tmp_path / "vn.png").is_file()


def test_an_old_lm_signature_leaves_the_centered_output_out_and_no_rows_draw_nothing(tmp_path):
    run = _run(tmp_path, steps=(10,), centered=False, keep_logits=False)
    doc = outputs.outputs_numbers(run)
    assert doc["missing"] == ["centered"] and set(doc["final"]) == {"", "_logp"}
    assert any("not formed" in line for line in outputs.summary_lines([run]))
    empty = Run(tmp_path / "none", {"sweep": {"widths": [8, 16]}}, [], {})
    assert outputs.draw_outputs([empty], tmp_path / "x.png") is None
    assert outputs.summary_lines([empty]) == [] and outputs.summary_json([empty]) == {}
