"""4 CPU ranks (gloo), kept tiny for 2 cores: FSDP2 with uneven shards and HSDP in bf16.

- width 18 over 4 ranks: every 18-row parameter splits 5/5/5/3 rows; each rank's local element
  counts are asserted and the fp32 trajectory equals one process;
- dist.replicate=2 (HSDP, a 2x2 mesh: sharded within a pair, replicated across pairs) with bf16
  compute copies on gloo: each rank holds half of every parameter and the loss follows the fp32
  single-process trajectory to bf16 accuracy.
"""
import json
import math
from pathlib import Path

import pytest
import yaml

from fastwidth.config import load_config
from fastwidth.train.loop import run
from test_dist import ROOT, launch, losses  # tests/parallel is on sys.path (rootdir import mode)

pytestmark = [pytest.mark.dist, pytest.mark.slow]
CONFIG = {"model": {"arch": "gpt", "depth": 1, "head_dim": 6, "width": 18}, "param": {"base_width": 18},
          "data": {"source": "stdlib", "seq_len": 8, "batch_size": 8, "probe_size": 4},
          "train": {"steps": 4, "progress": False, "log_every": 1},
          "stats": {"every": 4, "sharpness_iters": 0, "ntk_points": 0, "kernel_points": 8}}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist4")
    cfg = {**CONFIG, "data": {**CONFIG["data"], "cache_dir": str(tmp / "cache")}}
    cfg_file = tmp / "tiny4.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    return tmp, cfg_file, run(load_config(cfg_file, [f"train.out_dir={tmp / 'single'}"]))


def local_counts(out: Path, world: int) -> list[dict]:
    per_rank = []
    for r in range(world):
        groups = json.loads((out / f"groups.rank{r}.json").read_text())["w18_s0"]
        per_rank.append({n: (shape, local) for g in groups for n, shape, local in zip(g["names"], g["shapes"], g["local"])})
    return per_rank


def test_four_ranks_uneven_shards(work):
    tmp, cfg_file, single = work
    out = tmp / "uneven"
    launch("torchrun", ROOT / "tests" / "parallel" / "groups_and_train.py", cfg_file,
           [f"train.out_dir={out}", "dist.backend=fsdp2"], nproc=4)
    ranks = local_counts(out, 4)
    seen_uneven = False
    for name, (shape, _) in ranks[0].items():
        rows = [ranks[r][name][1] // math.prod(shape[1:]) for r in range(4)]
        per = -(-shape[0] // 4)
        assert rows == [max(0, min(shape[0], (r + 1) * per) - r * per) for r in range(4)], (name, shape, rows)
        seen_uneven |= len(set(rows)) > 1
    assert seen_uneven and [ranks[r]["blocks.0.attn.q.weight"][1] for r in range(4)] == [90, 90, 90, 54]
    a, b = losses(single), losses(out)
    assert set(a) == set(b) and max(abs(a[k] - b[k]) / abs(a[k]) for k in a) < 1e-4


def test_hsdp_bf16_on_gloo(work):
    tmp, cfg_file, single = work
    out = tmp / "hsdp"
    launch("torchrun", ROOT / "tests" / "parallel" / "groups_and_train.py", cfg_file,
           [f"train.out_dir={out}", "dist.backend=fsdp2", "dist.replicate=2", "dist.mixed_precision=bf16"], nproc=4)
    ranks = local_counts(out, 4)
    q = [ranks[r]["blocks.0.attn.q.weight"][1] for r in range(4)]
    assert q == [162, 162, 162, 162]  # 18x18 split over the 2 ranks of each replica group
    a, b = losses(single), losses(out)
    err = max(abs(a[k] - b[k]) / abs(a[k]) for k in a)
    print(f"\nHSDP 2x2 bf16 vs one process fp32: max relative loss error {err:.1e}")
    assert set(a) == set(b) and 0 < err < 3e-2
