"""The paper configs (configs/paper/*.yaml): each loads, evaluates on a log schedule whose first
evaluations are steps 1, 2, 3 (the early regime), and the language models keep a random readout
(the initialization-variance dip needs one)."""
from pathlib import Path

import pytest

from fastwidth.config import load_config
from fastwidth.stats.schedule import EvalSchedule

PAPER = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml"))


def test_there_are_paper_configs():
    assert len(PAPER) >= 3


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_loads_with_a_log_schedule_starting_at_steps_1_2_3(path):
    cfg = load_config(path)
    sch = EvalSchedule.from_config(cfg)
    assert cfg.stats.schedule == "log"
    assert sch.steps()[:4] == [0, 1, 2, 3]
    assert sch.steps()[-1] == cfg.train.steps
    assert len(sch.steps()) - 1 == min(cfg.stats.evals, cfg.train.steps)
    if cfg.model.arch == "gpt":
        assert cfg.param.zero_readout is False
