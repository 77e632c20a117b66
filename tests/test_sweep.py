"""Learning-rate sweeps on one stream, stopping diverged members, non-finite numbers as JSON null."""
import json
import math
import os
import signal
from collections import Counter

import pytest

from fastwidth.config import resolve
from fastwidth.errors import ConfigError
from fastwidth.report.cli import make_report
from fastwidth.report.reader import load_run
from fastwidth.report.transfer import transfer_lines, transfer_summary
from fastwidth.trainer import loop
from fastwidth.trainer.loop import run
from fastwidth.run.metrics import MetricsWriter, read_metrics
from fastwidth.trainer.sweep import divergence_reason, member_name, refine_specs
from fastwidth.trainer.preempt import Preempted
from test_preempt import assert_bit_equal
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


@pytest.mark.slow  # a whole training run (several s): the second tier keeps the fast one under 5 minutes
def test_report_on_a_run_with_nan_strings_and_diverged_members(tmp_path):
    run_dir = run(cfg_of(tmp_path, TINY_MLP, *LR_SWEEP))
    with open(run_dir / "metrics.jsonl", "a") as f:   # what the loop wrote before non-finite became null
        f.write(json.dumps({"kind": "eval", "step": 8, "tokens": 64, "width": 16, "seed": 0, "base_lr": 1e-3,
                            "probe_loss": "nan", "probe_acc": "inf"}) + "\n")
    summary = make_report([run_dir], tmp_path / "report").read_text()
    assert "diverged" in summary and "w16_lr100_s0" in summary


# --------------------------------------------------------------------------- sweep.lr_refine

REFINE_SWEEP = ["train.steps=8", "sweep.lrs=[1e-3, 1e-2, 1e-1, 100]", "sweep.seeds=[0,1]", "stats.sharpness_iters=0",
                "stats.ntk_points=0", "stats.every=4", "sweep.lr_refine=2", "sweep.stack=false", "train.threads=1"]


def test_refine_specs_take_each_width_argmin_of_the_final_losses(tmp_path):
    cfg = resolve(cfg_of(tmp_path, TINY_MLP, *REFINE_SWEEP))   # the reference width (32) first, as the loop has it
    best = {16: 1e-2, 32: 1e-1}
    rows = [{"kind": "eval", "step": 8, "width": w, "seed": s, "base_lr": lr, "probe_loss": 1.0 + (lr != best[w]) + lr}
            for w in (16, 32) for s in (0, 1) for lr in (1e-3, 1e-2, 1e-1)]
    rows += [{"kind": "diverged", "step": 2, "width": w, "seed": s, "base_lr": 100.0} for w in (16, 32) for s in (0, 1)]
    rows += [{"kind": "eval", "step": 4, "width": 16, "seed": 0, "base_lr": 1e-1, "probe_loss": 0.0},   # not final
             {"kind": "eval", "step": 8, "width": 16, "seed": 0, "base_lr": 1e-1, "probe_loss": 0.0, "pass": "refine"}]
    specs = refine_specs(cfg, rows)
    # width 16: argmin 1e-2 between 1e-3 and 1e-1 (steps of 10, cut in 7: x1.39); 32: 1e-1 beside a diverged 100
    assert specs == [(32, 0.072, 0), (32, 0.072, 1), (32, 0.141, 0), (32, 0.141, 1),
                     (16, 0.00720, 0), (16, 0.00720, 1), (16, 0.0139, 0), (16, 0.0139, 1)]
    # statistics off: the mean training loss of the last 10% of steps decides (here the last step)
    train = [{**r, "kind": "train", "loss": r["probe_loss"]} for r in rows if r["kind"] == "eval" and r["step"] == 8
             and "pass" not in r] + [r for r in rows if r["kind"] == "diverged"]
    assert refine_specs(cfg, train + [{**train[0], "step": 1, "loss": -5.0}]) == specs
    # a seed that diverged makes its learning rate lose at that width: 16's argmin is the grid's edge 1e-3
    rows.append({"kind": "diverged", "step": 5, "width": 16, "seed": 1, "base_lr": 1e-2})
    assert {lr for w, lr, _ in refine_specs(cfg, rows) if w == 16} == {0.00072, 0.00139}


def test_lr_refine_needs_a_grid_of_absolute_learning_rates(tmp_path):
    with pytest.raises(ConfigError, match="sweep.lr_refine=2 .* at least 2 entries"):
        cfg_of(tmp_path, TINY_MLP, "sweep.lr_refine=2", "sweep.lrs=[1e-3]")
    with pytest.raises(ConfigError, match="lr_unit=absolute"):
        cfg_of(tmp_path, TINY_MLP, "sweep.lr_refine=2", "sweep.lrs=[1e-3, 1e-2]", "optim.lr_unit=edge")
    with pytest.raises(ConfigError, match="sweep.lr_refine"):
        cfg_of(tmp_path, TINY_MLP, "sweep.lr_refine=-1", "sweep.lrs=[1e-3, 1e-2]")


def _interrupt_refinement(monkeypatch, at_step: int, how):
    """Make the first refined member call how() as it starts step at_step + 1 (one model at a time)."""
    step_of = loop.Trainer.train_step

    def train_step(self, m, x, y):
        if m.pass_name == "refine" and m.step == at_step and m is next(x for x in self.members if x.pass_name):
            how()
        return step_of(self, m, x, y)
    monkeypatch.setattr(loop.Trainer, "train_step", train_step)


@pytest.mark.slow
def test_lr_refine_trains_around_each_argmin_on_the_same_stream_and_resumes_across_passes(tmp_path, monkeypatch):
    cfg = cfg_of(tmp_path, TINY_MLP, *REFINE_SWEEP, out="straight")
    straight = run(cfg)
    rows = read_metrics(straight / "metrics.jsonl")
    first = [r for r in rows if r.get("pass") != "refine"]
    refined = [r for r in rows if r.get("pass") == "refine"]
    # the refined members are the picks around each width's argmin of the first pass's final probe losses
    specs = refine_specs(resolve(cfg), first)
    assert len(specs) == 2 * 2 * 2 and sorted({(r["width"], r["base_lr"], r["seed"]) for r in refined
                                               if r["kind"] == "train"}) == sorted(specs)
    final = {(r["width"], r["base_lr"]): r["probe_loss"] for r in first if r["kind"] == "eval" and r["step"] == 8}
    for w in (16, 32):
        grid = sorted((lr for ww, lr in final if ww == w), key=lambda lr: final[(w, lr)])
        assert all(grid[0] / 10 < lr < grid[0] * 10 and lr not in grid for ww, lr, _ in specs if ww == w)
    # same stream and init: a refined member's first loss (before any update) equals its coarse siblings'
    step1 = {(r["width"], r["seed"], r["base_lr"]): r["loss"] for r in rows if r["kind"] == "train" and r["step"] == 1}
    for w, lr, s in specs:
        assert step1[(w, s, lr)] == step1[(w, s, 1e-3)]
    assert max(r["step"] for r in refined if r["kind"] == "train") == 8 and rows[-1]["kind"] == "run"
    assert rows[-1]["models"] == 16 + 8 and {r["kind"] for r in refined} >= {"train", "eval"}
    # the transfer table and summary.json: the coarse grid's drift and the union grid's side by side
    transfer = transfer_summary(load_run(straight))
    assert transfer["refined"]["lrs"] == sorted({1e-3, 1e-2, 1e-1, 100.0} | {lr for _, lr, _ in specs})
    assert transfer["coarse"]["lrs"] == [1e-3, 1e-2, 1e-1, 100.0]
    assert {"slope", "ci", "resolution", "below_grid_resolution"} <= set(transfer["refined"])
    assert transfer["refined"]["resolution"] < transfer["coarse"]["resolution"]
    table = "\n".join(transfer_lines([load_run(straight)]))
    assert "refined grid (sweep.lr_refine)" in table and "resolves ±" in table

    # SIGTERM in the middle of the refinement pass: resume=auto ends bit-equal to the run never stopped
    _interrupt_refinement(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Preempted):
        run(cfg_of(tmp_path, TINY_MLP, *REFINE_SWEEP, out="stopped"))
    monkeypatch.undo()
    assert_bit_equal(straight, run(cfg_of(tmp_path, TINY_MLP, *REFINE_SWEEP, "train.resume=auto", out="stopped")))

    # a crash inside the refinement pass before its first checkpoint: the resume starts it again from
    # the first pass's checkpoint, dropping the crashed attempt's rows
    def crash():
        raise RuntimeError("node lost")
    _interrupt_refinement(monkeypatch, 3, crash)
    with pytest.raises(RuntimeError, match="node lost"):
        run(cfg_of(tmp_path, TINY_MLP, *REFINE_SWEEP, out="crashed"))
    monkeypatch.undo()
    assert any(r.get("pass") == "refine" for r in read_metrics(tmp_path / "crashed" / "metrics.jsonl"))
    assert_bit_equal(straight, run(cfg_of(tmp_path, TINY_MLP, *REFINE_SWEEP, "train.resume=auto", out="crashed")))
