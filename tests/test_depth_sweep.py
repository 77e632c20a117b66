"""Sweeps over depth on one stream (sweep.depths): members, config rules, init, rows, the planner,
and a depth sweep's members equal to the same members trained alone."""
import hashlib

import pytest
import torch

from fastwidth.config import load_config, resolve
from fastwidth.errors import ConfigError
from fastwidth.param.scaling import ParamInfo, draw_init, init_depth, init_seed
from fastwidth.run import MemberSpec, member_specs
from fastwidth.run.metrics import read_metrics
from test_train import TINY_GPT, cfg_of

DEPTH_SWEEP = ["sweep.widths=[16,32]", "sweep.depths=[1,2]", "sweep.seeds=[0,1]"]


def test_members_of_a_depth_sweep_put_the_reference_width_and_depth_first():
    cfg = resolve(load_config(None, ["sweep.widths=[32,64]", "sweep.depths=[2,4,8]", "sweep.seeds=[0,1]"]))
    specs = member_specs(cfg)
    assert cfg.sweep.reference_depth == 8                     # 0 = the deepest
    assert [s.name for s in specs[:3]] == ["w64_d8_s0", "w64_d8_s1", "w64_d2_s0"]
    assert len(specs) == 2 * 3 * 2 and len({s.name for s in specs}) == 12
    assert {(s.width, s.depth) for s in specs} == {(w, d) for w in (32, 64) for d in (2, 4, 8)}
    picked = member_specs(resolve(load_config(None, ["sweep.depths=[2,4]", "sweep.reference_depth=2",
                                                     "sweep.lrs=[1e-3]"])))
    assert [s.name for s in picked] == ["w128_d2_lr0.001_s0", "w128_d4_lr0.001_s0"]
    assert MemberSpec.parse("w64_d4_lr0.001_s0") == MemberSpec(64, 0.001, 0, 4)
    assert all(s.depth is None for s in member_specs(resolve(load_config(None, ["sweep.widths=[32,64]"]))))


@pytest.mark.parametrize("sets, words", [
    (["sweep.depths=[0,2]"], "sweep.depths: every entry must be a positive integer, got 0"),
    (["sweep.depths=[2,2]"], "sweep.depths has duplicates"),
    (["sweep.depths=[2,4]", "sweep.reference_depth=3"], "sweep.reference_depth 3 is not in sweep.depths [2, 4]"),
    (["sweep.reference_depth=3"], "sweep.reference_depth 3 is not in sweep.depths []"),
    (["sweep.depths=[2,4]", "sweep.lrs=[1e-3,1e-2]", "sweep.lr_refine=2"], "sweep.lr_refine"),
])
def test_bad_depth_sweeps_are_one_line(sets, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, sets)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_init_seed_has_the_depth_only_in_a_depth_sweep():
    """Written from the rule: sha256 of "seed:width:name:block", with ":d<depth>" after the width
    for a depth sweep's member only; every other run keeps its draws."""
    def seed_of(key):
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    assert init_seed(3, 64, "blocks.0.attn.q.weight", 1) == seed_of("3:64:blocks.0.attn.q.weight:1")
    assert init_seed(3, 64, "w", 0, depth=4) == seed_of("3:64:d4:w:0")
    assert init_depth(load_config(None, ["model.depth=4"])) is None
    assert init_depth(load_config(None, ["model.depth=4", "sweep.depths=[4]"])) == 4
    info = ParamInfo(name="w", shape=(70, 5), role="hidden", init="normal", init_std=1.0, lr_mult=1.0, wd_mult=1.0, forward_mult=1.0)
    two, four = draw_init(info, 0, 64, depth=2), draw_init(info, 0, 64, depth=4)
    assert torch.corrcoef(torch.stack([two.flatten(), four.flatten()]))[0, 1].abs() < 0.1   # independent draws
    assert torch.equal(draw_init(info, 0, 64, (3, 67), depth=2), two[3:67])                # shards still agree


def planner_configs():
    sets = ["model.arch=gpt", "model.width=16", "model.head_dim=8", "sweep.widths=[16]", "sweep.seeds=[0]",
            "data.source=stdlib", "data.seq_len=8", "train.steps=10"]
    return [resolve(load_config(None, [*sets, *extra])) for extra in (["model.depth=2"], ["sweep.depths=[2,8]"],
                                                                       ["model.depth=8"])]


def test_the_planner_plans_each_member_at_its_depth():
    from fastwidth.parallel.plan import Choice, plan_sweep
    p1, p2, p8 = (plan_sweep(c, 1, Choice("none")) for c in planner_configs())
    assert p2["members"] == 2 and p2["params"] == pytest.approx(p1["params"] + p8["params"])
    assert p2["optimizer"] == pytest.approx(p1["optimizer"] + p8["optimizer"])


@pytest.mark.slow
def test_depth_sweep_members_equal_the_same_members_trained_alone(tmp_path):
    """2 depths x 2 seeds at 2 widths on one stream: each member equals itself in a one-depth run
    (1e-6; stacking off so both train one by one), rows carry depth / ref_depth / axis, and
    load_model rebuilds a depth member from its name."""
    from fastwidth.trainer.load import load_model
    from fastwidth.trainer.loop import run
    common = [*DEPTH_SWEEP, "train.steps=4", "stats.every=2", "stats.sharpness_iters=0", "stats.ntk_points=0",
              "sweep.stack=false", "param.kind=completep", "param.base_depth=1"]
    sweep = run(cfg_of(tmp_path, TINY_GPT, *common, out="sweep"))
    alone = run(cfg_of(tmp_path, TINY_GPT, *common, "sweep.depths=[1]", out="alone"))
    rows = read_metrics(sweep / "metrics.jsonl")
    losses = {(r["width"], r["depth"], r["seed"], r["step"]): r["loss"] for r in rows if r["kind"] == "train"}
    lone = {(r["width"], r["depth"], r["seed"], r["step"]): r["loss"] for r in read_metrics(alone / "metrics.jsonl")
            if r["kind"] == "train"}
    assert set(lone) == {k for k in losses if k[1] == 1} and len(lone) == 16
    for k, v in lone.items():
        assert losses[k] == pytest.approx(v, abs=1e-6)
    for name in ("w16_d1_s1", "w32_d1_s0"):
        a, b = load_model(sweep, name), load_model(alone, name)
        assert len(a.blocks) == 1
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.allclose(p, q, atol=1e-6), n
    deeper = dict(load_model(sweep, "w16_d2_s0").named_parameters())
    assert len([n for n in deeper if n.startswith("blocks.1.")]) > 0
    # one seed, two depths: independent draws (the depth is in the init seed), block 0 included
    shallow = dict(load_model(sweep, "w16_d1_s0").named_parameters())
    assert not torch.allclose(shallow["blocks.0.attn.q.weight"], deeper["blocks.0.attn.q.weight"], atol=1e-3)
    for r in rows:
        if r["kind"] in ("train", "eval"):
            assert r["depth"] in (1, 2)
        if r["kind"] in ("consistency", "ensemble", "fit"):
            assert r["axis"] in ("width", "depth") and "ref_depth" in r
            if r["axis"] == "width":
                assert r["ref_depth"] == r["depth"]
            else:
                assert r["ref_depth"] == 2 and r.get("ref_width", r["width"]) == r["width"]
    across = [r for r in rows if r["kind"] == "consistency" and r["axis"] == "depth"]
    assert {(r["width"], r["depth"], r["seed"]) for r in across} == {(w, 1, s) for w in (16, 32) for s in (0, 1)}
    assert all(r["cka_ref_layer"] == {"block0": "block1"} for r in across)


@pytest.mark.slow
def test_a_resumed_depth_sweep_is_bit_equal(tmp_path):
    """Checkpoints find depth members by name; a sequential sweep's resume cuts each member's rows
    at its own step (run/metrics.truncate_after keys them by depth)."""
    import json
    from test_preempt import final_weights, rows_without_wall_time
    from fastwidth.trainer.loop import run
    common = [*DEPTH_SWEEP, "sweep.widths=[16]", "stats.every=2", "stats.sharpness_iters=0", "stats.ntk_points=0",
              "sweep.stack=false", "sweep.mode=sequential"]
    straight = run(cfg_of(tmp_path, TINY_GPT, *common, "train.steps=4", out="straight"))
    run(cfg_of(tmp_path, TINY_GPT, *common, "train.steps=2", out="resumed"))
    resumed = run(cfg_of(tmp_path, TINY_GPT, *common, "train.steps=4", "train.resume=true", out="resumed"))
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    # sequential: the resumed run writes the first member's steps 3-4 after the others' 1-2, so
    # the rows are the same set in another order
    def rows(d):
        return sorted(json.dumps(r, sort_keys=True) for r in rows_without_wall_time(d))
    assert rows(straight) == rows(resumed)
