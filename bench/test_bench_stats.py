"""Cost of the in-loop statistics: training steps with the Monitor's hooks and its evaluations at
the config's cadence (stats.every) against the same steps without (baseline).

overhead = median(with stats) / median(without) - 1, read from the group's table.
"""

import pytest

from conftest import fresh_members, train_step

STEPS = 4  # = stats.every of the benchmark sweep: one evaluation per round


class NullWriter:
    def write(self, row):
        pass


@pytest.mark.benchmark(group="stats: overhead")
@pytest.mark.parametrize("stats", ["on", "off"])
def test_stats_overhead(benchmark, sweep, stats, tmp_path):
    from fastwidth.stats.monitor import Monitor
    cfg, stream, device = sweep
    members = fresh_members(sweep)
    mon = Monitor(cfg, tmp_path, members, stream.probe(), NullWriter(), device) if stats == "on" else None
    if mon is not None:
        mon.evaluate(0, 0)
    start = iter(range(0, 10_000, STEPS))

    def steps():
        s0 = next(start)
        for s in range(s0, s0 + STEPS):
            b = stream.batch(s)
            for m in members:
                train_step(m, b["x"], b["y"], cfg, mon.training(m) if mon else None)
        if mon is not None:
            mon.evaluate(s0 + STEPS, (s0 + STEPS) * cfg.data.batch_size * cfg.data.seq_len)

    benchmark.pedantic(steps, rounds=3, iterations=1, warmup_rounds=1)
    if mon is not None:
        assert list(tmp_path.rglob("*.safetensors"))  # the evaluations really wrote signatures


@pytest.mark.benchmark(group="stats: eNTK per-point gradients")
@pytest.mark.parametrize("grads", ["vmap", "loop"])
def test_entk_gradients(benchmark, grads):
    """The exact eNTK of a µP MLP (width 128, 32 points): torch.func batched against one backward
    per point (the baseline); bench/bench_ntk.py measures the full size (width 256, 128 points)."""
    from bench_ntk import setup
    from fastwidth.kernels import dispatch
    from fastwidth.stats.ntk import entk
    model, out = setup(128, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    info = {}

    def run():
        with dispatch.using("torch"):
            return entk(out.fn, out.n, params, method="exact", batched=out.batched if grads == "vmap" else None,
                        info=info)[0]

    K = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert info["grads"] == grads and K.shape == (32, 32)
