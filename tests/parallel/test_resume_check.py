"""A DeepSpeed checkpoint of another ZeRO stage, or ZeRO-1/2 shards of another rank count, is
refused from meta.json alone, before any engine or model is built (parallel.checkpoint.
check_resumable); ZeRO-3 shards of another rank count go on to the universal conversion."""
import json

import pytest

from fastwidth.config import load_config
from fastwidth.errors import CheckpointError
from fastwidth.trainer.engine_checkpoint import check_resumable


def saved(tmp_path, world: int, stage: int):
    step = tmp_path / "run" / "checkpoints" / "step_000010"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 10, "engine": {"backend": "deepspeed", "world_size": world,
                                                                        "zero_stage": stage}}))
    (step.parent / "latest").write_text("step_000010\n")
    return tmp_path / "run"


def cfg_of(run, stage: int, resume=True):
    return load_config(None, [f"train.out_dir={run}", f"train.resume={str(resume).lower()}",
                              "dist.backend=deepspeed", f"dist.zero_stage={stage}"])


def test_other_rank_count_or_stage_is_refused_from_meta(tmp_path):
    run = saved(tmp_path / "z2", world=2, stage=2)
    check_resumable(cfg_of(run, 2), 2)                       # the same layout: fine
    with pytest.raises(CheckpointError, match="ZeRO-2 shards of 2 ranks; resume on 2 ranks"):
        check_resumable(cfg_of(run, 2), 1)
    with pytest.raises(CheckpointError, match="with that stage"):
        check_resumable(cfg_of(run, 3), 2)
    check_resumable(cfg_of(run, 2, resume=False), 1)         # a fresh start reads nothing


def test_zero3_on_another_rank_count_goes_on_to_the_universal_conversion(tmp_path):
    run = saved(tmp_path, world=2, stage=3)
    check_resumable(cfg_of(run, 3), 1)
    check_resumable(cfg_of(run, 3), 4)
    with pytest.raises(CheckpointError, match="with that stage"):
        check_resumable(cfg_of(run, 2), 2)


def test_no_checkpoint_is_left_to_the_run_directory_check(tmp_path):
    check_resumable(cfg_of(tmp_path / "none", 3), 1)
