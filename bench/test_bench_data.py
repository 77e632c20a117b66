"""Data readers against what the training step needs: batches/s of stream.batch(step) for token
windows (the stdlib corpus, memory-mapped shards) beside one lock-step optimizer step of the
benchmark sweep (baseline). The reader keeps up when its time per batch is far below the step's.
"""
import pytest

from conftest import fresh_members, train_step


@pytest.mark.benchmark(group="data: reader vs train step")
def test_token_reader(benchmark, sweep):
    cfg, stream, _ = sweep
    steps = iter(range(100_000))
    b = benchmark(lambda: stream.batch(next(steps)))
    assert b["x"].shape == (cfg.data.batch_size, cfg.data.seq_len)


@pytest.mark.benchmark(group="data: reader vs train step")
def test_train_step_that_consumes_it(benchmark, sweep):
    cfg, stream, _ = sweep
    members = fresh_members(sweep)
    b = stream.batch(0)

    def step():
        for m in members:
            train_step(m, b["x"], b["y"], cfg)

    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
