"""The sharded reduction of preactivation histograms (stats/ranks.py, Monitor.sync_preacts and
Monitor.sync_ranges) on 2 CPU ranks (gloo): each rank accumulates its half of every batch's rows in
asinh units; after merge_over_ranks rank 0 holds the histogram of the whole batches, equal count
for count to one process accumulating them whole, and its moments to float64 rounding; a Monitor
whose rank holds no bins takes rank 0's from sync_ranges and builds its accumulators on them."""
import json
import socket
import sys
from pathlib import Path

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


RANGES = {f"layer{i}": {"units": "asinh", "lo": -5.0, "hi": 5.0, "center": 0.3, "scale": 0.7} for i in (0, 1)}


def _monitor(rank: int, run_dir: Path):
    """A Monitor of one toy member (tests/stats/stats_toys.py) whose run_dir holds RANGES on rank 0 only."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stats"))
    from stats_toys import ListWriter, Member, ToyMLP, teacher_data

    from fastwidth.config import Config
    from fastwidth.stats.monitor import Monitor
    from fastwidth.stats.preact_range import save_ranges

    cfg = Config()
    cfg.sweep.widths, cfg.sweep.seeds, cfg.sweep.reference_width = [8], [0], 8
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_ranges(run_dir, RANGES)
    px, py = teacher_data(8, seed=1)
    return Monitor(cfg, run_dir, [Member(8, 0, ToyMLP(6, 8, 4))], {"x": px, "y": py}, ListWriter(), "cpu",
                   rank=rank, world=2)


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from fastwidth.stats.ranks import merge_over_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        acc = _acc()
        for x in _batches():
            acc.update(x[6 * rank:6 * (rank + 1)])
        merge_over_ranks({"layer": acc}, rank, 2)
        mon = _monitor(rank, Path(f"{out}.run{rank}"))
        before = sorted(mon.state_dict()["preact"]["w8_s0"])
        mon.sync_ranges()
        bins = {layer: [a["lo"], a["hi"], a["asinh"]] for layer, a in mon.state_dict()["preact"]["w8_s0"].items()}
        r = acc.result()
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"hist": r["hist"].tolist(), "moments": [r[k] for k in ("count", "mean", "var", "skew", "kurt")],
                       "ranges": mon.ranges, "layers_before": before, "bins": bins}, f)
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
    assert got[0]["ranges"] == RANGES and got[1]["ranges"] == RANGES
    assert got[0]["layers_before"] == ["layer0", "layer1"] and got[1]["layers_before"] == []
    assert got[1]["bins"] == got[0]["bins"] and sorted(got[0]["bins"]) == ["layer0", "layer1"]
