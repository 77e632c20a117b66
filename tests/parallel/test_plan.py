"""The planner against measured CPU peak memory.

Absolute CPU peaks carry a fixed runtime overhead the planner does not model (torch / gloo
threads and allocator pools: 110-230 MB measured per rank), so the check is on what the planner
predicts: the memory that grows with the model. Peak(width 3072) - peak(width 1536) measured
per rank must be within 20% of the planned difference, for one process and for fsdp2 on 2 ranks.
"""
import json
import sys

import pytest
import yaml

from fastwidth.config import load_config
from fastwidth.parallel.plan import plan_memory
from test_dist import ROOT, launch  # tests/parallel is on sys.path (rootdir import mode)

pytestmark = [pytest.mark.dist, pytest.mark.slow]
CFG = {"model": {"arch": "mlp", "depth": 4, "width": 1536}, "param": {"base_width": 64},
       "data": {"source": "synthetic", "batch_size": 64, "in_dim": 32, "num_classes": 10, "probe_size": 16},
       "train": {"steps": 3, "progress": False}, "stats": {"enabled": False}}


def measured(tmp_path, launcher, backend, width, nproc):
    f = tmp_path / "mem.yaml"
    f.write_text(yaml.safe_dump(CFG))
    res = launch(launcher, ROOT / "tests" / "parallel" / "mem_probe.py", f,
                 [f"train.out_dir={tmp_path / f'{backend}{width}'}", f"dist.backend={backend}",
                  f"model.width={width}"], nproc=nproc)
    rows = [json.loads(l[4:]) for l in res.stdout.splitlines() if l.startswith("MEM ")]
    assert len(rows) == nproc, res.stdout[-2000:]
    return max(r["peak"] for r in rows)


@pytest.mark.parametrize("backend,launcher,world", [("none", "python", 1), ("fsdp2", "torchrun", 2)])
def test_planned_memory_growth_matches_measured(tmp_path, backend, launcher, world):
    planned, got = {}, {}
    for w in (1536, 3072):
        cfg = load_config(None, [f"{k}={v}" for k, v in [("model.arch", "mlp"), ("model.depth", 4),
                                 ("model.width", w), ("param.base_width", 64), ("data.source", "synthetic"),
                                 ("data.batch_size", 64), ("data.in_dim", 32), ("data.num_classes", 10)]])
        planned[w] = plan_memory(cfg, backend, world)["total"]
        got[w] = measured(tmp_path, launcher, backend, w, world)
    dp, dm = planned[3072] - planned[1536], got[3072] - got[1536]
    err = abs(dm - dp) / dm
    print(f"\n{backend}: planned growth {dp / 2**20:.0f} MiB, measured {dm / 2**20:.0f} MiB, error {err:.1%}")
    assert err < 0.2
