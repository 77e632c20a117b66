"""Lock-step vs one model at a time: the same steps of every member of a sweep.

lockstep: each step's batch is read once and every model steps on it (the loop's default).
sequential (baseline): each model reads the stream itself and takes its steps alone.
tokens/s = steps × batch_size × seq_len × models / wall seconds (extra_info, per round).
"""
import pytest

from conftest import fresh_members, tokens_of, train_step

STEPS = 3


def run_lockstep(members, stream, cfg, start):
    for s in range(start, start + STEPS):
        b = stream.batch(s)
        for m in members:
            train_step(m, b["x"], b["y"], cfg)


def run_sequential(members, stream, cfg, start):
    for m in members:
        for s in range(start, start + STEPS):
            b = stream.batch(s)
            train_step(m, b["x"], b["y"], cfg)


@pytest.mark.benchmark(group="train: lockstep vs sequential")
@pytest.mark.parametrize("mode", ["lockstep", "sequential"])
def test_train_steps(benchmark, sweep, mode):
    cfg, stream, _ = sweep
    members = fresh_members(sweep)
    fn = run_lockstep if mode == "lockstep" else run_sequential
    rounds = iter(range(0, 10_000, STEPS))
    benchmark.pedantic(lambda: fn(members, stream, cfg, next(rounds)), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = tokens_of(cfg, STEPS, len(members)) / benchmark.stats.stats.median
    assert all(m.step == 4 * STEPS for m in members)  # warm-up + 3 rounds
