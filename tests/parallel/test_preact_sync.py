"""The sharded reduction of preactivation histograms (parallel/stats.py) on 2 CPU ranks (gloo):
each rank accumulates its half of every batch's rows in asinh units; after sync_preacts rank 0
holds the histogram of the whole batches, equal count for count to one process accumulating them
whole, and its moments to float64 rounding; sync_ranges gives a rank without bins rank 0's."""
import json
import socket

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ASINH, STRIDE, BINS = (0.3, 0.7), 3, 24


def _batches():
    g = torch.Generator().manual_seed(11)
    return [0.5 + 4.0 * torch.randn(12, 9, generator=g) ** 3 for _ in range(5)]  # 6 x 9 rows per rank: strides align


def _acc():
    from fastwidth.stats.moments import PreactAccumulator
    return PreactAccumulator(BINS, -5.0, 5.0, STRIDE, asinh=ASINH)


class _Mon:
    """The part of a Monitor that sync_ranges reads and rebuilds."""

    def __init__(self, ranges):
        self.ranges, self.acc, self.made = ranges, {"m": {}}, False

    def _make_accumulators(self):
        self.made = True


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from fastwidth.parallel.stats import sync_preacts, sync_ranges

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        acc = _acc()
        for x in _batches():
            acc.update(x[6 * rank:6 * (rank + 1)])
        sync_preacts({"layer": acc}, 2)
        mon = _Mon({"layer": {"units": "asinh", "lo": -5.0, "hi": 5.0, "center": 0.3, "scale": 0.7}} if rank == 0 else None)
        sync_ranges(mon, 2)
        r = acc.result()
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"hist": r["hist"].tolist(), "moments": [r[k] for k in ("count", "mean", "var", "skew", "kurt")],
                       "ranges": mon.ranges, "made": mon.made}, f)
    finally:
        dist.destroy_process_group()


def test_sharded_histograms_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    mp.spawn(_rank, args=(port, out), nprocs=2, join=True)
    got = [json.loads(open(f"{out}.{r}").read()) for r in (0, 1)]
    one = _acc()
    for x in _batches():
        one.update(x)
    want = one.result()
    np.testing.assert_array_equal(got[0]["hist"], want["hist"])
    assert got[0]["hist"][0] + got[0]["hist"][-1] > 0          # the overflow bins are exercised
    np.testing.assert_allclose(got[0]["moments"], [want[k] for k in ("count", "mean", "var", "skew", "kurt")],
                               rtol=1e-6)
    assert sum(got[1]["hist"]) == 0                             # the other rank's rows now live in rank 0's
    assert got[1]["ranges"] == got[0]["ranges"] and got[1]["made"] and not got[0]["made"]
