"""A user's module family (model.arch python, tests/usermodels/engine_families.py) under every
engine on 2 CPU ranks (gloo): the training losses equal one process's (relative error < 1e-4,
as the GPT's engine tests), for a transformer-ish LM whose blocks sit in a nested ModuleList
(body.layers: shard units come from UserModel.shard_units, not the root's children) and whose
RoPE table is a non-persistent buffer (to_empty leaves garbage; reset_buffers restores it), and
for a plain MLP. Launched ranks import the factory by its spec."""
import pytest
import yaml

from test_dist import ROOT, launch, launcher_of, losses, rel_err  # tests/parallel is on sys.path

pytestmark = [pytest.mark.dist, pytest.mark.slow]

FAMILIES = {
    "lm": {"model": {"arch": "python", "factory": "tests.usermodels.engine_families:make_tiny_lm", "depth": 2},
           "data": {"source": "stdlib", "seq_len": 16, "batch_size": 8, "probe_size": 8}},
    "mlp": {"model": {"arch": "python", "factory": "tests.usermodels.engine_families:make_mlp"},
            "data": {"source": "synthetic", "in_dim": 32, "num_classes": 10, "batch_size": 8, "probe_size": 8}},
}
COMMON = {"param": {"base_width": 16}, "sweep": {"widths": [16, 32], "seeds": [0]},
          "train": {"steps": 4, "progress": False, "log_every": 1, "kernels": "torch", "report": False},
          "stats": {"every": 2, "sharpness_iters": 0, "ntk_points": 0, "kernel_points": 8}}
ENGINES = {"ddp": ["dist.backend=ddp"], "fsdp2": ["dist.backend=fsdp2"],
           "zero1": ["dist.backend=deepspeed", "dist.zero_stage=1"],
           "zero2": ["dist.backend=deepspeed", "dist.zero_stage=2"],
           "zero3": ["dist.backend=deepspeed", "dist.zero_stage=3"]}
# The LM under every engine (nested blocks, its RoPE buffer, partitioned shapes read for roles:
# where a user's model differs from fastwidth's own) and the MLP under ZeRO-3; 25-75 s a launch.
CASES = [("lm", e) for e in ENGINES] + [("mlp", "zero3")]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("user_engines")
    done = {}

    def single(family):
        if family not in done:
            cfg = {**COMMON, **FAMILIES[family]}
            cfg["data"] = {**cfg["data"], "cache_dir": str(tmp / "cache")}
            cfg_file = tmp / f"{family}.yaml"
            cfg_file.write_text(yaml.safe_dump(cfg))
            launch("python", ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={tmp / family / 'none'}"])
            done[family] = cfg_file
        return done[family]
    return tmp, single


@pytest.mark.parametrize("family,engine", CASES)
def test_user_family_trains_under_every_engine_as_in_one_process(work, family, engine):
    tmp, single = work
    cfg_file = single(family)
    out = tmp / family / engine
    backend = "zero" if engine.startswith("zero") else engine
    launch(launcher_of(backend), ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={out}", *ENGINES[engine]])
    a, b = losses(tmp / family / "none"), losses(out)
    err = rel_err(a, b)
    print(f"\n{family} {engine}: max relative loss error over 4 steps x 2 widths = {err:.2e}; "
          f"final losses {[round(b[k], 6) for k in sorted(b) if k[1] == 4]}")
    assert err < 1e-4
