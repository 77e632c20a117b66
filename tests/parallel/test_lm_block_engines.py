"""The LM block (grouped-query attention, QK-norm, tied embeddings, z-loss) under every engine on 2
CPU ranks (gloo): the training losses, probe losses and in-loop statistics (the preactivation
moments of attn_q and mlp_fc, the feature kernels of the blocks) equal one process. Under FSDP2
and ZeRO-3 the tied matrix stays one parameter (embed.weight, with no readout.weight beside it),
gathered for the readout's use by the root unit (FSDP2) or as an external parameter (ZeRO-3).
"""
import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_dist import ROOT, evals, launch, launcher_of, losses, rel_err  # tests/parallel is on sys.path
from test_stats_engines import ENGINES as ALL_ENGINES

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# base width 16, head_dim 8: 2 query heads on 1 kv head at the base, so widths 16 and 32 have 2 on 1
# and 4 on 2 (group 2)
CONFIG = {"model": {"arch": "gpt", "depth": 2, "head_dim": 8, "qk_norm": True, "n_kv_heads": 1,
                    "tie_embeddings": True},
          "param": {"base_width": 16, "zero_readout": False},
          "data": {"source": "stdlib", "seq_len": 16, "batch_size": 8, "probe_size": 8},
          "sweep": {"widths": [16, 32], "seeds": [0]},
          "train": {"steps": 6, "progress": False, "log_every": 1, "kernels": "torch", "report": False,
                    "z_loss": 1e-3, "ckpt_every": 6},
          "stats": {"every": 3, "sharpness_iters": 0, "ntk_points": 0, "kernel_points": 8}}
ENGINES = {k: ALL_ENGINES[k] for k in ("ddp", "fsdp2", "zero1", "zero2", "zero3")}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_block_engines")
    cfg_file = tmp / "lm_block.yaml"
    cfg_file.write_text(yaml.safe_dump({**CONFIG, "data": {**CONFIG["data"], "cache_dir": str(tmp / "cache")}}))
    launch("python", ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={tmp / 'single'}"])
    return tmp, cfg_file, tmp / "single"


@pytest.mark.parametrize("engine", list(ENGINES))
def test_lm_block_trains_under_every_engine_as_in_one_process(work, engine):
    tmp, cfg_file, single = work
    out = tmp / engine
    backend = "zero" if "deepspeed" in ENGINES[engine][0] else engine
    launch(launcher_of(backend), ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={out}", *ENGINES[engine]])
    err = rel_err(losses(single), losses(out))
    print(f"\n{engine}: max relative loss error over 6 steps x 2 widths = {err:.2e}")
    assert err < 1e-4
    ea, eb = evals(single), evals(out)
    assert set(ea) == set(eb)
    layers = set()
    for k in ea:
        assert eb[k]["probe_loss"] == pytest.approx(ea[k]["probe_loss"], rel=1e-5)
        for layer, mom in ea[k].get("preact", {}).items():
            layers.add(layer.split(".")[-1])
            for stat in ("mean", "var"):
                assert eb[k]["preact"][layer][stat] == pytest.approx(mom[stat], rel=1e-4, abs=1e-5), (k, layer, stat)
    assert {"attn_q", "mlp_fc"} <= layers, layers
    compared = 0
    for sig_file in sorted((single / "signatures").rglob("step_*.safetensors")):
        a, b = load_file(str(sig_file)), load_file(str(out / sig_file.relative_to(single)))
        for key in (k for k in a if k.startswith("kernel/")):
            torch.testing.assert_close(b[key].double(), a[key].double(), rtol=1e-4, atol=1e-5)
            compared += 1
    assert compared
