"""LRMonitors (stats/lr_groups.py): one Monitor per learning rate behind the Monitor's interface.

Each learning rate's rows are exactly those of a plain Monitor over that learning rate's members
alone, with base_lr added; a stopped member leaves only its own learning rate's comparisons."""
import pytest
import torch

from fastwidth.stats.lr_groups import LRMonitors, monitor_for
from fastwidth.stats.monitor import Monitor
from stats_toys import ListWriter, Member, ToyMLP, teacher_data
from test_monitor import B, EVERY, STEPS, make_cfg, train_batch, train_members

LRS = (0.05, 0.2)


def lr_members(lrs, widths=(8, 16), seeds=(0, 1)):
    out = []
    for lr in lrs:
        for w in widths:
            for s in seeds:
                m = Member(w, s, ToyMLP(6, w, 4, seed=s), lr=lr)
                m.base_lr, m.name = lr, f"w{w}_lr{lr:g}_s{s}"
                out.append(m)
    return out


def drive(monitor, members, stop=None) -> None:
    """The loop's calls on one monitor: evaluate at 0, train with hooks, sync and evaluate every
    EVERY steps; stop(step) -> members to drop after that step's training."""
    monitor.sync_ranges()
    monitor.evaluate(0, 0)
    live = list(members)
    for step in range(STEPS):
        train_members(monitor, live, step)
        for m in (stop(step + 1) if stop else []):
            m.step = step + 1
            monitor.drop(m)
            live.remove(m)
        if (step + 1) % EVERY == 0:
            monitor.sync_preacts(live)
            monitor.evaluate(step + 1, (step + 1) * B, live)


def probe():
    px, py = teacher_data(40, seed=99)
    return {"x": px, "y": py}


def test_each_learning_rate_equals_a_monitor_of_its_members(tmp_path):
    cfg = make_cfg([8, 16], [0, 1], sharpness_iters=0, ntk_points=0)
    cfg.sweep.lrs = list(LRS)
    writer = ListWriter()
    members = lr_members(LRS)
    mon = monitor_for(cfg, tmp_path / "all", members, probe(), writer, "cpu")
    assert isinstance(mon, LRMonitors) and len(mon.monitors) == 2
    drive(mon, members)
    assert {r["kind"] for r in writer.rows} >= {"eval", "consistency", "ensemble", "fit"}
    for lr in LRS:
        alone = ListWriter()
        own = lr_members([lr])
        drive(Monitor(cfg, tmp_path / f"lr{lr}", own, probe(), alone, "cpu"), own)
        tagged = [{k: v for k, v in r.items() if k != "base_lr"} for r in writer.rows if r["base_lr"] == lr]
        assert tagged == alone.rows, lr
    state = mon.state_dict()
    again = monitor_for(cfg, tmp_path / "again", lr_members(LRS), probe(), ListWriter(), "cpu")
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_a_stopped_member_leaves_only_its_learning_rate(tmp_path):
    cfg = make_cfg([8, 16], [0], sharpness_iters=0, ntk_points=0)
    cfg.sweep.lrs = list(LRS)
    writer = ListWriter()
    members = lr_members(LRS, seeds=(0,))
    wide = next(m for m in members if m.base_lr == LRS[1] and m.width == 16)
    drive(monitor_for(cfg, tmp_path, members, probe(), writer, "cpu"), members,
          stop=lambda step: [wide] if step == 1 else [])
    skipped = [r for r in writer.rows if r["kind"] == "skipped"]
    assert len(skipped) == 1 and skipped[0]["base_lr"] == LRS[1] and "reference width 16" in skipped[0]["reason"]
    after = {r["base_lr"] for r in writer.rows if r["kind"] == "consistency" and r["step"] > 1}
    assert after == {LRS[0]}


@pytest.mark.parametrize("lrs", [[], list(LRS)])
def test_sync_methods_are_no_ops_in_one_process(tmp_path, lrs):
    """world 1: sync_preacts / sync_ranges / keep_on_main leave every summary as accumulated."""
    cfg = make_cfg([8, 16], [0], sharpness_iters=0, ntk_points=0)
    cfg.sweep.lrs = lrs
    members = lr_members(lrs, seeds=(0,)) if lrs else [Member(w, 0, ToyMLP(6, w, 4)) for w in (8, 16)]
    mon = monitor_for(cfg, tmp_path, members, probe(), ListWriter(), "cpu")
    x, _ = train_batch(0)
    for m in members:
        with mon.training(m), torch.no_grad():
            m.model(x)
    before = mon.state_dict()
    mon.sync_ranges()
    mon.sync_preacts(members)
    mon.keep_on_main()
    assert mon.state_dict() == before
