"""Edge-of-stability table and figure (report/eos.py) on trajectories planted by hand."""
import json
import math

import pytest
import yaml

from fastwidth.report import eos
from fastwidth.report.reader import load_run


def test_onset_plateau_and_catapults_of_planted_sequences():
    steps = list(range(8))
    x = [1.0, 1.5, 1.9, 2.0, 2.4, 1.8, 2.2, 2.0]
    assert eos.onset_step(steps, x) == 3 and eos.onset_step(steps, [1.0] * 8) is None
    p = eos.plateau(steps, x, 3)               # |x-2| over steps 3..7: 0, .4, .2, .2, 0
    assert p["mean_abs"] == pytest.approx(0.16) and p["mean"] == pytest.approx(2.08) and p["points"] == 5
    assert math.isnan(eos.plateau(steps, x, None)["mean_abs"])
    loss = [1.0, 0.5, 0.4, 3.0, 6.0, 0.7, 0.3, 0.2, 0.5, 0.1]    # one spike (peak 6 over min 0.4); 0.5 > 2×0.2
    cats = eos.catapults(list(range(10)), loss, factor=2.0)
    assert [(c["start"], c["step"]) for c in cats] == [(3, 4), (8, 8)]
    assert cats[0]["height"] == pytest.approx(15.0) and cats[1]["height"] == pytest.approx(2.5)
    assert eos.catapults(list(range(5)), [1.0, 0.9, 1.5, 0.8, 0.7]) == []     # 1.5 < 2 × 0.9: no catapult


def eos_run(path, seeds=(0, 1, 2), second_catapult=(0, 1)):
    """Per seed s: x rises linearly and crosses 2 at step 10 + s, then stays at 2.5; the loss has a
    catapult of height 10 at step 5 + s, and a second one (height 4, step 30) in `second_catapult`."""
    path.mkdir(parents=True)
    cfg = {"optim": {"name": "sgd", "lr_unit": "edge"}, "param": {"kind": "mup"},
           "sweep": {"widths": [32], "lrs": [1.5], "seeds": list(seeds)}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = []
    for s in seeds:
        on = 10 + s
        for t in range(41):
            x = 2.0 * t / on if t < on else 2.5
            rows.append({"kind": "batch_sharpness", "step": t, "width": 32, "seed": s, "base_lr": 1.5,
                         "sharpness": x * 50.0, "edge": 100.0, "converged": t % 2 == 0})
            loss = 1.0 / (1 + t)
            loss *= 10.0 if t == 5 + s else 4.0 if (t == 30 and s in second_catapult) else 1.0
            rows.append({"kind": "train", "step": t, "width": 32, "seed": s, "base_lr": 1.5, "loss": loss})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_run(path)


def test_eos_table_intervals_over_seeds_and_na(tmp_path):
    run = eos_run(tmp_path / "r")
    (row,) = eos.eos_table(run)
    assert row["onset_per_seed"] == [10, 11, 12] and row["onset"]["value"] == pytest.approx(11.0)
    lo, hi = row["onset"]["ci"]
    assert lo <= 11 <= hi and hi - lo > 0
    assert row["plateau_mean_abs"]["value"] == pytest.approx(0.5) and row["plateau_mean"]["value"] == pytest.approx(2.5)
    assert row["converged"] == pytest.approx(21 / 41)
    assert row["catapult_counts"] == [2, 2, 1]
    first, second = row["catapults"]
    planted = [10.0 * (5 + s) / (6 + s) for s in range(3)]      # peak 10/(6+s) over the running min 1/(5+s)
    assert first["height"]["value"] == pytest.approx(sum(planted) / 3)
    assert first["step"]["value"] == pytest.approx(6.0) and second["height"] is None and second["seeds_with"] == 2
    text = "\n".join(eos.summary_lines([run]))
    assert "n/a (2/3 seeds)" in text and "| 1.5 | 32 | 3 | 11 [" in text
    doc = eos.summary_json([run])
    assert doc["runs"][0]["rows"][0]["catapult_counts"] == [2, 2, 1]
    json.dumps(doc, allow_nan=True)


def test_eos_seed_never_at_the_edge_is_na_and_figure(tmp_path):
    run = eos_run(tmp_path / "r")
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        if r["kind"] == "batch_sharpness" and r["seed"] == 2:
            r["sharpness"] = 40.0                                             # x = 0.8 throughout
    (tmp_path / "r" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    run = load_run(tmp_path / "r")
    (row,) = eos.eos_table(run)
    assert row["onset_per_seed"] == [10, 11, None] and row["onset"] is None
    assert "n/a (2/3 seeds reach 2)" in "\n".join(eos.summary_lines([run]))
    assert eos.eos_seeds([run], tmp_path / "e.png").stat().st_size > 20_000
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text(yaml.safe_dump({"sweep": {"widths": [32]}}))
    (tmp_path / "empty" / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "width": 32, "seed": 0,
                                                                   "loss": 1.0}) + "\n")
    empty = load_run(tmp_path / "empty")
    assert eos.eos_seeds([empty], tmp_path / "n.png") is None
    assert eos.summary_lines([empty]) == [] and eos.summary_json([empty]) == {}


def test_adam_rows_before_the_first_step_are_left_out(tmp_path):
    path = tmp_path / "a"
    path.mkdir()
    (path / "config.yaml").write_text(yaml.safe_dump({"optim": {"name": "adam"}, "sweep": {"widths": [32]}}))
    # step 0: no v̂ (precond lr); steps 1-9: v̂ of a few batches, x far past the edge; from step 10
    # (1/(1 - β1)) the table reads
    rows = [{"kind": "batch_sharpness", "step": t, "width": 32, "seed": 0, "sharpness": s, "edge": 38.0,
             "precond": "lr" if t == 0 else "adam"}
            for t, s in ((0, 100.0), (1, 5000.0), (2, 400.0), (10, 19.0), (12, 40.0))]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = load_run(path)
    assert eos.adam_warmup(run) == 10
    ((_, seeds),) = eos.trajectories(run).items()
    assert seeds[0]["steps"] == [10, 12] and seeds[0]["x"] == pytest.approx([1.0, 40 / 19])
    assert eos.eos_table(run)[0]["onset_per_seed"] == [12]
    assert "threshold (2+2β1)/(1-β1) = 38" in "\n".join(eos.summary_lines([run]))
