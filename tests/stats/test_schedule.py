"""The evaluation schedule (stats/schedule.py): linear and log, and the loop evaluating at it."""
import math

import numpy as np
import pytest

from fastwidth.stats.schedule import EvalSchedule, log_steps


@pytest.mark.parametrize("steps,evals", [(250, 24), (468, 20), (10_000, 30), (37, 12), (100, 2), (3000, 7)])
def test_log_steps_are_distinct_start_at_one_end_at_the_last_and_spread_in_log(steps, evals):
    s = log_steps(steps, evals)
    assert len(s) == evals and s[0] == 1 and s[-1] == steps
    assert all(b > a for a, b in zip(s, s[1:]))
    # past the integer-crowded start the points are geometric: consecutive ratios within 35% of the
    # ratio of an exact geometric grid over the same span
    late = [(a, b) for a, b in zip(s, s[1:]) if a >= 20]
    if len(late) >= 3:
        ratios = np.array([b / a for a, b in late])
        ideal = (s[-1] / late[0][0]) ** (1 / len(late))
        assert np.all(np.abs(np.log(ratios / ideal)) < math.log(1.35)), (ratios, ideal)


def test_log_steps_take_every_step_when_there_are_fewer_steps_than_evaluations():
    assert log_steps(5, 24) == [1, 2, 3, 4, 5]
    assert log_steps(0, 5) == []


def test_linear_schedule_evaluates_every_k_steps_and_at_the_end():
    sch = EvalSchedule(total=53, kind="linear", every=25)
    assert sch.steps() == [0, 25, 50, 53]
    assert [t for t in range(1, 54) if sch.due(t)] == [25, 50, 53]


def test_log_schedule_due_agrees_with_its_steps():
    sch = EvalSchedule(total=250, kind="log", evals=24)
    assert [0] + [t for t in range(1, 251) if sch.due(t)] == sch.steps()
    assert sch.steps()[:5] == [0, 1, 2, 3, 4]


def test_the_loop_evaluates_at_the_log_schedule(tmp_path):
    from fastwidth.config import load_config
    from fastwidth.run.metrics import read_metrics
    from fastwidth.trainer.loop import run
    cfg = load_config(None, ["model.arch=mlp", "model.depth=2", "param.base_width=16", "data.source=synthetic",
                             "data.batch_size=8", "data.in_dim=6", "data.num_classes=3", "data.probe_size=16",
                             "sweep.widths=[16]", "train.progress=false", "train.report=false", "train.steps=30",
                             "stats.schedule=log", "stats.evals=8", "stats.kernel_points=0", "stats.preact=false",
                             "stats.sharpness_iters=0", "stats.ntk_points=0", f"train.out_dir={tmp_path / 'run'}"])
    run(cfg)
    steps = sorted({r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"})
    assert steps == EvalSchedule(total=30, kind="log", evals=8).steps() == [0] + log_steps(30, 8)
