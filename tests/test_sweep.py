"""Learning-rate sweeps on one stream, stopping diverged members, non-finite numbers as JSON null."""
import json
import math
from collections import Counter

import pytest

from fastwidth.errors import ConfigError
from fastwidth.report.cli import make_report
from fastwidth.train.loop import run
from fastwidth.train.metrics import MetricsWriter, read_metrics
from fastwidth.train.sweep import divergence_reason, member_name
from test_train import TINY_MLP, cfg_of, train_losses

LR_SWEEP = ["train.steps=8", "sweep.lrs=[1e-3, 3e-2, 100]", "sweep.seeds=[0,1]", "stats.sharpness_iters=0",
            "stats.ntk_points=0", "stats.every=4"]


def by_kind(rows):
    out = {}
    for r in rows:
        out.setdefault(r["kind"], []).append(r)
    return out


def test_lr_sweep_with_a_diverging_lr_runs_to_the_end(tmp_path):
    run_dir = run(cfg_of(tmp_path, TINY_MLP, *LR_SWEEP))
    rows = by_kind(read_metrics(run_dir / "metrics.jsonl"))
    # lr 100 (Adam) blows the logits up at once: all four of its members stop, at step 2
    div = rows["diverged"]
    assert sorted((r["width"], r["seed"]) for r in div) == [(16, 0), (16, 1), (32, 0), (32, 1)]
    for r in div:
        assert {"kind", "step", "width", "seed", "base_lr", "reason", "tokens"} <= set(r)
        assert r["base_lr"] == 100.0 and r["step"] == 2 and "first loss" in r["reason"]
    # no more compute: their last train row is the divergence step; the others train to the end
    last = Counter()
    for r in rows["train"]:
        last[(r["width"], r["seed"], r["base_lr"])] = max(last[(r["width"], r["seed"], r["base_lr"])], r["step"])
    assert {k: v for k, v in last.items() if k[2] == 100.0} == {(w, s, 100.0): 2 for w in (16, 32) for s in (0, 1)}
    assert all(v == 8 for k, v in last.items() if k[2] != 100.0) and len(last) == 12
    # every per-member row carries base_lr; the stopped members are left out of later statistics
    for kind in ("train", "eval", "consistency", "ensemble", "fit", "diverged"):
        assert all("base_lr" in r for r in rows[kind]), kind
    assert not [r for r in rows["eval"] if r["base_lr"] == 100.0 and r["step"] > 2]
    assert {r["base_lr"] for r in rows["ensemble"] if r["step"] == 8} == {1e-3, 3e-2}
    assert rows["run"][0]["diverged"] == 4 and rows["run"][0]["models"] == 12


def test_members_of_an_lr_sweep_equal_single_lr_runs(tmp_path):
    """Same batches for every member: the lr-3e-2 members of a sweep train exactly as a run at 3e-2
    (one model at a time: stacked, within 1e-6, tests/test_stacked.py)."""
    sweep = run(cfg_of(tmp_path, TINY_MLP, "train.steps=5", "sweep.lrs=[1e-3, 3e-2]", "sweep.stack=false", out="sweep"))
    alone = run(cfg_of(tmp_path, TINY_MLP, "train.steps=5", "optim.lr=3e-2", out="alone"))
    rows = [r for r in read_metrics(sweep / "metrics.jsonl") if r["kind"] == "train" and r["base_lr"] == 3e-2]
    assert {(r["width"], r["seed"], r["step"]): r["loss"] for r in rows} == train_losses(alone)
    seq = run(cfg_of(tmp_path, TINY_MLP, "train.steps=5", "sweep.lrs=[1e-3, 3e-2]", "sweep.mode=sequential",
                     out="seq"))
    key = lambda d: sorted((r["width"], r["seed"], r["base_lr"], r["step"], r["loss"])  # noqa: E731
                           for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "train")
    assert key(seq) == key(sweep)


def test_resume_keeps_diverged_members_stopped(tmp_path):
    straight = run(cfg_of(tmp_path, TINY_MLP, *LR_SWEEP, "train.steps=8", out="straight"))
    run(cfg_of(tmp_path, TINY_MLP, *LR_SWEEP, "train.steps=4", out="resumed"))
    resumed = run(cfg_of(tmp_path, TINY_MLP, *LR_SWEEP, "train.steps=8", "train.resume=true", out="resumed"))

    def rows_of(d):
        return sorted((r["kind"], r["width"], r["seed"], r.get("base_lr"), r["step"], r.get("loss"))
                      for r in read_metrics(d / "metrics.jsonl") if r["kind"] in ("train", "diverged"))
    assert rows_of(resumed) == rows_of(straight)


def test_member_names_are_unique():
    names = {member_name(w, s, lr) for w in (16, 32) for s in (0, 1) for lr in (1e-3, 3e-3, 1e-2)}
    assert len(names) == 12 and member_name(16, 0) == "w16_s0" and member_name(16, 1, 1e-3) == "w16_lr0.001_s1"


def test_divergence_reason():
    assert divergence_reason(math.nan, 2.0, 10.0) == "loss is nan"
    assert divergence_reason(math.inf, 2.0, 0.0) == "loss is inf"
    assert divergence_reason(19.9, 2.0, 10.0) is None
    assert "exceeds 10" in divergence_reason(20.1, 2.0, 10.0)
    assert divergence_reason(1e9, 2.0, 0.0) is None      # factor 0: only non-finite stops


@pytest.mark.parametrize("bad", ["[0.001, -1]", "[0.001, 0.001]", "[abc]"])
def test_bad_lrs_are_one_line_errors(bad, tmp_path):
    with pytest.raises(ConfigError, match="sweep.lrs"):
        cfg_of(tmp_path, TINY_MLP, f"sweep.lrs={bad}")


def test_non_finite_numbers_are_json_null_and_readers_tolerate_them(tmp_path):
    path = tmp_path / "m.jsonl"
    w = MetricsWriter(path)
    w.write({"kind": "train", "step": 1, "tokens": 1, "width": 1, "seed": 0, "loss": math.nan,
             "nested": {"a": [1.0, math.inf, -math.inf]}})
    w.close()
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text and '"nan"' not in text
    assert json.loads(text)["loss"] is None and json.loads(text)["nested"]["a"] == [1.0, None, None]
    # older runs wrote the strings "nan" / "inf": every reader maps them to None as well
    with open(path, "a") as f:
        f.write('{"kind": "train", "step": 2, "tokens": 2, "width": 1, "seed": 0, "loss": "nan", "x": NaN}\n')
    assert [r["loss"] for r in read_metrics(path)] == [None, None] and read_metrics(path)[1]["x"] is None


def test_report_on_a_run_with_nan_strings_and_diverged_members(tmp_path):
    run_dir = run(cfg_of(tmp_path, TINY_MLP, *LR_SWEEP))
    with open(run_dir / "metrics.jsonl", "a") as f:   # what the loop wrote before non-finite became null
        f.write(json.dumps({"kind": "eval", "step": 8, "tokens": 64, "width": 16, "seed": 0, "base_lr": 1e-3,
                            "probe_loss": "nan", "probe_acc": "inf"}) + "\n")
    summary = make_report([run_dir], tmp_path / "report").read_text()
    assert "diverged" in summary and "w16_lr100_s0" in summary
