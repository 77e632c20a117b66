"""train.threads=auto: the usable cores less the machine's load."""
import pytest
import torch

from fastwidth.config import load_config
from fastwidth.errors import ConfigError
from fastwidth.trainer.threads import auto_threads, set_threads, usable_cores


@pytest.mark.parametrize("cores,load,want", [(2, 0.0, 2), (2, 0.4, 2), (2, 0.7, 1), (2, 8.0, 1), (16, 3.2, 13),
                                             (1, 0.0, 1)])
def test_auto_takes_the_load_off_the_usable_cores(cores, load, want, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    n, why = auto_threads(cores, load)
    assert n == want and f"{cores} usable cores" in why


def test_local_ranks_share_the_cores_and_the_load(monkeypatch):
    import os
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert usable_cores() == max(1, len(os.sched_getaffinity(0)) // 2)
    assert auto_threads(8, 4.0)[0] == 6  # each of 2 ranks: 8 of its cores, half the load


def test_config_takes_auto_or_a_count_and_set_threads_applies_it():
    assert load_config(None, ["train.threads=auto"]).train.threads == "auto"
    assert load_config(None, ["train.threads=3"]).train.threads == 3
    for bad in ("many", "-1", "true"):
        with pytest.raises(ConfigError, match="train.threads"):
            load_config(None, [f"train.threads={bad}"])
    before = torch.get_num_threads()
    try:
        n = set_threads("auto")
        assert 1 <= n <= usable_cores() and torch.get_num_threads() == n
        assert set_threads(1) == 1
    finally:
        torch.set_num_threads(before)
