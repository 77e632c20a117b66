"""A Hugging Face Llama (model.arch hf) at widths 32 and 64 trains 10 steps under one process, DDP,
FSDP2 and DeepSpeed ZeRO-3 on 2 CPU ranks (gloo) with equal losses: the inferred µP table, the attention scale on
each layer's `scaling` and the readout hook survive each engine's wrapping (FSDP2 shards the
transformers decoder layers, to_empty replaces the parameters the model reads)."""
import sys

import pytest
import yaml

from test_dist import ROOT, launch, launcher_of, losses, rel_err  # tests/parallel is on sys.path

pytestmark = [pytest.mark.dist, pytest.mark.slow]

CONFIG = {"model": {"arch": "hf", "hf": {"model_type": "llama"}, "depth": 2, "head_dim": 8},
          "param": {"base_width": 32, "zero_readout": False},
          "data": {"source": "stdlib", "seq_len": 16, "batch_size": 8, "probe_size": 8},
          "sweep": {"widths": [32, 64], "seeds": [0]},
          "train": {"steps": 10, "progress": False, "log_every": 1, "report": False},
          "stats": {"every": 5, "sharpness_iters": 0, "ntk_points": 0, "kernel_points": 8}}
ENGINES = {"ddp": ["dist.backend=ddp"], "fsdp2": ["dist.backend=fsdp2"],
           "zero3": ["dist.backend=deepspeed", "dist.zero_stage=3"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"single" | engine: run directory}, each trained once from one config file."""
    tmp = tmp_path_factory.mktemp("hf_engines")
    cfg_file = tmp / "hf_llama.yaml"
    cfg_file.write_text(yaml.safe_dump({**CONFIG, "data": {**CONFIG["data"], "cache_dir": str(tmp / "cache")}}))
    dirs = {name: tmp / name for name in ("single", *ENGINES)}
    for name, out in dirs.items():
        launcher, sets = ("python", []) if name == "single" else (launcher_of(name), ENGINES[name])
        launch(launcher, ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={out}", *sets])
    return dirs


@pytest.mark.parametrize("engine", list(ENGINES))
def test_llama_trains_under_each_engine_as_in_one_process(runs, engine):
    a, b = losses(runs["single"]), losses(runs[engine])
    assert sorted(a) == [(w, s) for w in (32, 64) for s in range(1, 11)]
    err = rel_err(a, b)
    print(f"\n{engine}: max relative loss error over 10 steps x widths 32, 64 = {err:.2e}")
    for w in (32, 64):
        print(f"  width {w}: one process {[round(a[(w, s)], 4) for s in (1, 5, 10)]}, "
              f"{engine} {[round(b[(w, s)], 4) for s in (1, 5, 10)]} (steps 1, 5, 10)")
    assert err < 1e-5
    assert a[(64, 10)] < a[(64, 1)] and a[(32, 10)] < a[(32, 1)]


def test_llama_export_gives_equal_logits(runs):
    """`export --format hf` of the one-process run's w64_s0: from_pretrained gives fastwidth's logits."""
    sys.path.insert(0, str(ROOT / "tests" / "usermodels"))
    from test_hf_families import export_round_trip
    assert export_round_trip(runs["single"], runs["single"].parent / "llama_hf", "llama") < 1e-4
