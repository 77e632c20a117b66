"""A user's module family (model.arch python) through the rest of the loop: the engines' shard
units, ZeRO-3's partitioned shapes and the buffers to_empty loses (fast, no launch; the 2-rank
launches are tests/parallel/test_user_family_engines.py), FLOPs from its shapes against a hand
count, the stacker's one-line reason, the export with its forward multipliers folded, load_model,
resume in a new process, and the config checks that apply to it."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fastwidth.cli import main as cli_main
from fastwidth.config import CLASS_SOURCES, load_config
from fastwidth.errors import ConfigError
from fastwidth.models import build_meta
from fastwidth.models.user import infer_roles
from fastwidth.parallel.engines import shard_units
from fastwidth.run.metrics import read_metrics
from fastwidth.trainer import flops
from fastwidth.trainer.load import load_model
from fastwidth.trainer.loop import run
from tests.usermodels import engine_families as fam

ROOT = Path(__file__).resolve().parents[2]
LM = ["model.arch=python", "model.factory=tests.usermodels.engine_families:make_tiny_lm", "model.depth=2",
      "param.base_width=16", "data.source=stdlib", "data.seq_len=16"]
MLP = ["model.arch=python", "model.factory=tests.usermodels.engine_families:make_mlp", "param.base_width=16",
       "data.source=synthetic", "data.in_dim=32", "data.num_classes=10"]
TRAIN = ["data.batch_size=8", "data.probe_size=8", "sweep.widths=[16,32]", "train.progress=false",
         "train.log_every=1", "train.report=false", "train.kernels=torch", "stats.enabled=false"]
TOKENS = SimpleNamespace(kind="tokens", vocab_size=256, seq_len=16, in_shape=None, num_classes=None)
CLASSES = SimpleNamespace(kind="classes", vocab_size=None, seq_len=16, in_shape=(32,), num_classes=10)


def cfg(tmp_path, base, *extra, out="run"):
    return load_config(None, [*base, *TRAIN, f"train.out_dir={tmp_path / out}",
                              f"data.cache_dir={tmp_path / 'cache'}", *extra])


def train_losses(run_dir) -> dict:
    return {(r["width"], r["seed"], r["step"]): r["loss"]
            for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"}


def test_shard_units_are_the_nested_blocks(tmp_path):
    # the LM's blocks sit in body.layers, not among the root's children: the engines' shard units
    # must be UserModel.shard_units() (the root-children rule finds none)
    model = build_meta(cfg(tmp_path, LM, "model.width=32"), TOKENS)
    units = shard_units(model)
    assert units == list(model.body.layers) and len(units) == 2


def test_roles_read_from_zero3_partitions_equal_the_whole_shapes():
    # under deepspeed.zero.Init a parameter's .shape is its flat local partition and ds_shape the whole
    with torch.device("meta"):
        whole, base, delta = fam.make_tiny_lm(32, 2), fam.make_tiny_lm(16, 2), fam.make_tiny_lm(32, 2)
        parted = fam.make_tiny_lm(32, 2)
    for p in parted.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0, device="meta")
    assert infer_roles(parted, base, delta) == infer_roles(whole, base, delta)


def test_reset_buffers_restores_the_rope_table_after_to_empty(tmp_path):
    model = build_meta(cfg(tmp_path, LM, "model.width=32"), TOKENS)
    model.to_empty(device="cpu")
    model.body.rope.fill_(float("nan"))          # what to_empty may leave
    model.reset_buffers()
    torch.testing.assert_close(model.body.rope, fam.rope_table(fam.SEQ, fam.HEAD_DIM), rtol=0, atol=0)


@pytest.mark.parametrize("family,io,hand", [("lm", TOKENS, fam.hand_flops_tiny_lm(32, 2)),
                                            ("mlp", CLASSES, fam.hand_flops_mlp(32))])
def test_flops_per_token_of_a_users_model_equal_the_hand_count(tmp_path, family, io, hand):
    got = flops.flops_per_token(cfg(tmp_path, LM if family == "lm" else MLP, "model.width=32"), io)
    print(f"\n{family} width 32: flops_per_token {got:.0f}, by hand {hand:.0f}")
    assert got == hand > 0


def test_mlp_trains_one_by_one_says_why_once_and_carries_flops(tmp_path, caplog):
    caplog.set_level("INFO", logger="fastwidth")
    out = run(cfg(tmp_path, MLP, "sweep.seeds=[0,1]", "train.steps=2", "train.ckpt_every=2"))
    said = [r.getMessage() for r in caplog.records if "does not stack" in r.getMessage()]
    assert len(said) == 1 and "UserModel does not stack: model.arch=python" in said[0], said
    rows = [r for r in read_metrics(Path(out) / "metrics.jsonl") if r["kind"] == "train" and r["width"] == 32]
    assert rows and all(r["flops_per_token"] == fam.hand_flops_mlp(32) for r in rows)
    assert any("mfu" in r for r in rows) and all(r["mfu"] > 0 for r in rows if "mfu" in r)

    # export: the user's own names, the readout's α/m folded into head weights, loadable into make(width)
    path = tmp_path / "w32.safetensors"
    assert cli_main(["export", str(out), "--member", "w32_s0", "-o", str(path)]) == 0
    state = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["forward_mults"] == "folded" and json.loads(meta["folded"]) == {"w32_s0": {"out.weight": 0.5}}
    plain = fam.make_mlp(32)
    plain.load_state_dict(state)
    ours = load_model(out, "w32_s0")
    assert type(ours).__name__ == "UserModel"
    x = torch.randn(64, fam.IN_DIM, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), plain.eval()(x)
    diff = (a - b).abs().max().item()
    print(f"\nexport round trip: max |logit difference| {diff:.2e} (logits up to {a.abs().max().item():.3f})")
    assert diff <= 1e-6 and a.abs().max() > 0
    unfolded = fam.make_mlp(32)                  # the same weights without the fold: the hooks' α/m missing
    unfolded.load_state_dict({**state, "out.weight": state["out.weight"] / 0.5})
    with torch.no_grad():
        assert (unfolded.eval()(x) - a).abs().max() > 1e-4


@pytest.mark.parametrize("sets,says", [
    (["model.factory="], "needs model.factory"),
    (["model.factory=nocolon"], "write \"package.module:function\""),
    (["model.arch=mlp"], "is read only with model.arch=python"),
    (["model.factory=", "model.arch=mlp", "param.roles={head.weight: output}"], "param.roles overrides"),
    (["stats.ntk_output=trace"], "stats.ntk_output=trace is for classifiers"),
    (["model.act=swiglu"], "takes its activation from the factory"),
])
def test_config_checks_for_a_users_model_refuse_in_one_line(tmp_path, sets, says):
    with pytest.raises(ConfigError, match=".*" + says.replace("(", r"\(").replace(".", r"\.")) as err:
        cfg(tmp_path, LM, *sets)
    assert "\n" not in str(err.value)


def test_users_model_skips_the_gpt_only_checks(tmp_path):
    # head_dim 32 does not divide width 16 and n_heads is unused: a gpt check that must not fire here
    cfg(tmp_path, LM, "model.head_dim=7", "model.width=16", "sweep.widths=[16,48]")
    cfg(tmp_path, MLP, "stats.ntk_output=trace")   # a classifier may take the trace kernel


def test_class_sources_match_the_data_room():
    from fastwidth.data import SOURCES, TEXT_SOURCES
    assert set(CLASS_SOURCES) == set(SOURCES) - set(TEXT_SOURCES) - {"shards"}


@pytest.mark.slow
def test_resume_in_a_new_process_equals_the_uninterrupted_run(tmp_path):
    from tests.parallel.test_dist import rewind
    whole = run(cfg(tmp_path, LM, "train.steps=6", "train.ckpt_every=3", "stats.enabled=true", "stats.every=3",
                    out="whole"))   # statistics on: the probe rows resume too
    stopped = rewind(Path(whole), tmp_path / "stopped", 3)   # as if stopped at its step-3 checkpoint
    (stopped / "metrics.jsonl").unlink()   # so the rows after it come from the resumed process alone: a
    # resume writes a history_lost row at step 3 and steps 4-6; a fresh start would write steps 1-6
    res = subprocess.run([sys.executable, "-m", "fastwidth.cli", "train", "--config", str(stopped / "config.yaml"),
                          "--set", f"train.out_dir={stopped}", "train.resume=auto", "train.threads=1"],
                         capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"},
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    after = read_metrics(stopped / "metrics.jsonl")
    assert [r["step"] for r in after if r["kind"] == "history_lost"] == [3]
    a, b = train_losses(whole), train_losses(stopped)
    assert sorted({k[2] for k in b}) == [4, 5, 6]
    worst = max(abs(a[k] - b[k]) for k in b)
    print(f"\nresume in a new process: final losses {sorted((k[0], b[k]) for k in b if k[2] == 6)}, "
          f"max |difference| over steps 4-6 x 2 widths = {worst:.1e}")
    assert worst == 0.0
    lm = load_model(stopped, "w32_s0")            # a token model back (KIND_OF_ARCH python: kind from the source)
    tokens = torch.randint(0, fam.VOCAB, (2, fam.SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert lm(tokens).shape == (2, fam.SEQ, fam.VOCAB) and torch.isfinite(lm(tokens)).all()
    probe = {(r["width"], r["step"]): r["probe_loss"] for r in after if r["kind"] == "eval"}
    assert probe and probe == {(r["width"], r["step"]): r["probe_loss"] for r in read_metrics(Path(whole) / "metrics.jsonl")
                               if r["kind"] == "eval" and r["step"] > 3}


@pytest.mark.slow
def test_a_main_factory_refuses_to_resume_in_another_process(tmp_path):
    script = tmp_path / "mine.py"
    script.write_text(textwrap.dedent(f"""
        import fastwidth
        from torch import nn
        def make(width):
            return nn.Sequential(nn.Flatten(), nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 10))
        fastwidth.train("fmnist_mlp", model=make, data={{"source": "synthetic", "in_dim": 32, "num_classes": 10,
                        "batch_size": 8, "probe_size": 8, "cache_dir": r"{tmp_path / 'cache'}"}},
                        param={{"base_width": 16}}, sweep={{"widths": [16, 32], "seeds": [0]}},
                        stats={{"enabled": False}},
                        train={{"steps": 2, "progress": False, "report": False, "threads": 1,
                               "out_dir": r"{tmp_path / 'mine'}"}})
    """))
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"}
    first = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run([sys.executable, "-m", "fastwidth.cli", "train", "--config",
                            str(tmp_path / "mine" / "config.yaml"), "--set", "train.steps=4", "train.resume=auto"],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    lines = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert again.returncode == 2 and len(lines) == 1, again.stderr[-3000:]
    assert "<python>:make" in lines[0] and "__main__" in lines[0]


def test_planner_measures_a_users_activations(tmp_path):
    # the MLP family saves, per example, the outputs of its three ReLUs (each read again by the next
    # matmul: one tensor, counted once): 3 vectors of width N; the rest (input, logits) is width-free
    from fastwidth.parallel.plan import activation_values, count_params
    c32, c64 = (count_params(cfg(tmp_path, MLP, f"model.width={w}")) for w in (32, 64))
    assert c64["act_row"] - c32["act_row"] == 3 * 32
    assert activation_values(cfg(tmp_path, MLP, "model.width=32"), c32, rows=8) == 8 * c32["act_row"]
    assert c32["units"] == 2 and c32["row_len"] == 1


def test_foldable_takes_linear_weights_and_refuses_branch_multipliers():
    from fastwidth.errors import CheckpointError
    from fastwidth.trainer.engine_checkpoint import foldable

    def row(name, init, shape, fwd, branch=1.0):
        return {"name": name, "init": init, "shape": shape, "forward_mult": fwd, "branch_mult": branch}
    rows = [row("out.weight", "zeros", [10, 32], 0.5), row("out.bias", "zeros", [10], 1.0),
            row("inp.weight", "normal", [32, 8], 1.0), row("norm.weight", "ones", [32], 2.0)]
    assert foldable(rows) == {"out.weight": 0.5}
    with pytest.raises(CheckpointError, match="cannot be folded"):
        foldable([*rows, row("blocks.0.fc.weight", "normal", [32, 32], 1.0, branch=0.7)])
