"""Per-group Adam ε on every engine: completep at depth 4 (base depth 2) under ddp, ZeRO-1 and
FSDP2 on 2 gloo ranks. Every rank's optimizer groups carry the table's ε (ε × m_N^-1 × m_L^-1 inside
the blocks, ε × m_N^-1 outside) and the final parameters after 3 steps match the single-process run's
(test_depth_engines.py compares the losses under every engine)."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from fastwidth.config import load_config
from fastwidth.trainer.load import load_model
from fastwidth.trainer.loop import run

from test_dist import ROOT, launch, launcher_of

pytestmark = [pytest.mark.dist, pytest.mark.slow]
CONFIG = {"model": {"arch": "gpt", "depth": 4, "head_dim": 8, "norm": "layer", "bias": True},
          "param": {"kind": "completep", "base_width": 16, "base_depth": 2, "zero_readout": False},
          "optim": {"eps": 1e-4, "weight_decay": 0.1, "grad_clip": 0.0},
          "data": {"source": "stdlib", "seq_len": 16, "batch_size": 8, "probe_size": 8},
          "sweep": {"widths": [32], "seeds": [0]},
          "train": {"steps": 3, "progress": False, "log_every": 1, "report": False}, "stats": {"enabled": False}}
BACKENDS = {"ddp": ["dist.backend=ddp"], "zero1": ["dist.backend=deepspeed", "dist.zero_stage=1"],
            "fsdp2": ["dist.backend=fsdp2"]}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("group_eps")
    cfg_file = tmp / "completep.yaml"
    cfg_file.write_text(yaml.safe_dump({**CONFIG, "data": {**CONFIG["data"], "cache_dir": str(tmp / "cache")}}))
    return cfg_file, Path(run(load_config(cfg_file, [f"train.out_dir={tmp / 'single'}"])))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_completep_on_two_ranks_equals_one_process(single, backend):
    cfg_file, one = single
    out = cfg_file.parent / backend
    launch(launcher_of(backend), ROOT / "tests" / "parallel" / "groups_and_train.py", cfg_file,
           [f"train.out_dir={out}", *BACKENDS[backend]])
    ref = load_model(one, "w32_s0")
    table = ref.mup_table
    for rank in (0, 1):
        groups = json.loads((out / f"groups.rank{rank}.json").read_text())["w32_s0"]
        for g in groups:
            for name in g["names"]:
                assert g["eps"] == pytest.approx(1e-4 * table[name].eps_mult, rel=1e-12), (rank, name)
        assert len({g["eps"] for g in groups}) == 2  # inside and outside the blocks
    got = dict(load_model(out, "w32_s0").named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-6, msg=name)
