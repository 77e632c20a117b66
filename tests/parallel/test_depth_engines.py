"""completep at depth 4 (base depth 2, so every branch output × 0.5, biases on) on 2 CPU ranks (gloo) under
ddp, fsdp2 and DeepSpeed ZeRO 1-3 trains as one process does (test_dist.py's engine settings and
tolerance: relative loss error < 1e-4), every rank's optimizer groups carry the table's Adam ε
(ε × m_N^-1 × m_L^-1 on the blocks, ε × m_N^-1 outside: groups_and_train.py dumps them), and a ddp
run resumed from its step-3 checkpoint continues bit for bit."""
import json
from pathlib import Path

import pytest
import yaml

from fastwidth.config import load_config
from fastwidth.data import build_stream
from fastwidth.models import build_model
from fastwidth.trainer.load import load_model
from fastwidth.trainer.loop import run
from tests.parallel.test_dist import BACKENDS, CONFIG, ROOT, launch, launcher_of, losses, rel_err, rewind

pytestmark = [pytest.mark.slow, pytest.mark.dist]

DEPTH_CONFIG = {**CONFIG, "model": {**CONFIG["model"], "depth": 4, "bias": True},  # o and proj biases scale too
                "param": {**CONFIG["param"], "kind": "completep", "base_depth": 2, "zero_readout": False},
                "train": {**CONFIG["train"], "steps": 6, "ckpt_every": 3, "report": False},
                "stats": {"every": 3, "sharpness_iters": 0, "ntk_points": 0, "kernel_points": 8}}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("depth_engines")
    cfg_file = tmp / "depth.yaml"
    data = {**DEPTH_CONFIG["data"], "cache_dir": str(tmp / "cache")}
    cfg_file.write_text(yaml.safe_dump({**DEPTH_CONFIG, "data": data}))
    cfg = load_config(cfg_file, [f"train.out_dir={tmp / 'single'}"])
    model, table = build_model(cfg, build_stream(cfg.data), seed=0)
    # the multiplier is really there: each branch's last layer carries m_L^-α = (4/2)^-1
    assert model.blocks[3].attn.o.branch == model.blocks[0].mlp.proj.branch == 0.5
    assert table["blocks.3.attn.o.weight"].branch_mult == 0.5
    single = Path(run(cfg))
    # the same run without the multiplier (base depth 4) trains otherwise: the comparisons can fail
    unscaled = run(load_config(cfg_file, [f"train.out_dir={tmp / 'unscaled'}", "param.base_depth=4"]))
    assert rel_err(losses(single), losses(unscaled)) > 1e-2
    return tmp, cfg_file, single


@pytest.fixture(scope="module")
def two_ranks(work):
    """backend -> its 2-rank run directory (trained once, shared by the tests below)."""
    tmp, cfg_file, _ = work
    done = {}

    def get(backend: str) -> Path:
        if backend not in done:
            done[backend] = tmp / backend
            launch(launcher_of(backend), ROOT / "tests" / "parallel" / "groups_and_train.py", cfg_file,
                   [f"train.out_dir={done[backend]}", *BACKENDS[backend]])
        return done[backend]
    return get


@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "zero1", "zero2", "zero3"])
def test_completep_on_two_ranks_matches_one(work, two_ranks, backend):
    _, _, single = work
    out = two_ranks(backend)
    err = rel_err(losses(single), losses(out))
    print(f"\ncompletep depth 4, {backend}: max relative loss error over 6 steps x 2 widths = {err:.2e}")
    assert err < 1e-4
    eps = load_config(single / "config.yaml").optim.eps
    for rank in (0, 1):
        for member, groups in json.loads((out / f"groups.rank{rank}.json").read_text()).items():
            table = load_model(single, member).mup_table
            for g in groups:
                for name in g["names"]:
                    assert g["eps"] == pytest.approx(eps * table[name].eps_mult, rel=1e-12), (backend, rank, name)
            assert len({g["eps"] for g in groups}) == 2, (backend, member)  # on the blocks and outside


def test_completep_resume_is_bit_equal(work, two_ranks):
    tmp, cfg_file, _ = work
    straight = two_ranks("ddp")
    again = rewind(straight, tmp / "ddp-resumed", 3)
    launch("torchrun", ROOT / "launch" / "train.py", cfg_file,
           [f"train.out_dir={again}", "train.resume=true", *BACKENDS["ddp"]])
    a, b = losses(straight), losses(again)
    assert set(a) == set(b) and max(s for _, s in a) == 6
    assert a == b  # float equality: bit for bit
