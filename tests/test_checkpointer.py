"""The engine is always there (one process included), members are handles, and one checkpointer
saves and restores the members and every component that registered with it."""
import json

import pytest
import torch

from fastwidth.config import load_config, resolve
from fastwidth.data import build_stream
from fastwidth.errors import CheckpointError
from fastwidth.parallel.engines import Engine
from fastwidth.parallel.env import DistEnv
from fastwidth.parallel.placement import Placement, build_engine
from fastwidth.run import checkpoint as ckpt
from fastwidth.trainer.checkpointer import RNG, Checkpointer, State
from fastwidth.trainer.members import make_members

TINY_MLP = ["model.arch=mlp", "model.depth=2", "param.base_width=16", "data.source=synthetic",
            "data.batch_size=8", "data.in_dim=6", "data.num_classes=3", "data.probe_size=16",
            "sweep.widths=[16,32]", "sweep.seeds=[0,1]", "param.zero_readout=false"]


def setup(tmp_path):
    cfg = resolve(load_config(None, [*TINY_MLP, f"train.out_dir={tmp_path / 'run'}"]))
    stream = build_stream(cfg.data)
    return cfg, stream, make_members(cfg, stream, torch.device("cpu"))


def step_all(members, stream, step):
    b = stream.batch(step)
    for m in members:
        m.handle.train_step(b["x"], b["y"])
        m.grad_norm, m.step = m.handle.grad_norm, m.step + 1


def test_single_process_has_an_engine_like_the_others(tmp_path):
    cfg, stream, members = setup(tmp_path)
    engine = build_engine(cfg, DistEnv())
    assert type(engine) is Engine and engine.name == "none" and engine.whole_checkpoint
    placement = Placement(cfg, DistEnv())
    assert type(placement.main) is Engine and placement.for_width(32) is placement.main
    assert [m.name for m in members] == ["w32_s0", "w32_s1", "w16_s0", "w16_s1"]  # the reference width first
    for m in members:  # the member's model and optimizer are its handle's
        assert m.handle.name == m.name and m.model is m.handle.model and m.optimizer is m.handle.optimizer
        assert type(m.engine) is Engine
    before = members[0].model.readout.weight.detach().clone()
    step_all(members, stream, 0)
    assert not torch.equal(before, members[0].model.readout.weight)
    assert all(m.grad_norm is not None and float(m.grad_norm) > 0 for m in members)
    with members[0].handle.gathered() as whole:  # one process: the member itself
        assert whole.model is members[0].model and whole.optimizer is members[0].optimizer


class Counter:
    """A component: its state is a count, and it records the order in which it was restored."""

    def __init__(self, log, name):
        self.log, self.name, self.n = log, name, 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, d):
        self.n = d["n"]
        self.log.append(self.name)


def test_checkpointer_round_trips_members_and_components(tmp_path):
    cfg, stream, members = setup(tmp_path)
    root = tmp_path / "run" / "checkpoints"
    saver = Checkpointer(cfg, members[0].engine, members, root)
    log = []
    saver.register("data", stream)
    saver.register("rng", RNG)
    saver.register("first", Counter(log, "first"))
    saver.register("second", State(lambda: {"k": 7}, lambda d: log.append(("second", d["k"]))))
    for s in range(3):
        step_all(members, stream, s)
    saver.components["first"].n = 5
    path = saver.save(final=False)
    assert path == root / "step_000003" and ckpt.latest_checkpoint(root) == path
    meta = json.loads((path / "meta.json").read_text())
    assert meta["first"] == {"n": 5} and meta["second"] == {"k": 7} and meta["final"] is False
    assert "engine" not in meta and sorted(meta["mup_tables"]) == sorted(m.name for m in members)
    draw_after_save = torch.rand(3)

    _, stream2, fresh = setup(tmp_path)  # a new process: members at init, fresh components
    loader = Checkpointer(cfg, fresh[0].engine, fresh, root)
    loader.register("data", stream2)
    loader.register("rng", RNG)
    loader.register("first", Counter(log, "first"))
    loader.register("second", State(lambda: {}, lambda d: log.append(("second", d["k"]))))
    meta = ckpt.read_checkpoint(path)
    loader.load_members(meta)
    loader.load_state(meta)
    assert log == ["first", ("second", 7)] and loader.components["first"].n == 5
    assert torch.equal(torch.rand(3), draw_after_save)  # the RNG goes on where the saved run was
    for a, b in zip(members, fresh):
        assert b.step == 3
        for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
            assert torch.equal(p, q), n
    step_all(members, stream, 3)  # the resumed members take the same next step (optimizer state too)
    step_all(fresh, stream2, 3)
    for a, b in zip(members, fresh):
        assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_single_process_engine_refuses_a_sharded_checkpoint_in_one_line(tmp_path):
    cfg, _, members = setup(tmp_path)
    root = tmp_path / "run" / "checkpoints"
    Checkpointer(cfg, members[0].engine, members, root).save(final=True)
    meta = ckpt.read_checkpoint(ckpt.latest_checkpoint(root))
    meta["engine"] = {"backend": "fsdp2", "world_size": 2, "zero_stage": 0}
    with pytest.raises(CheckpointError, match="saved by dist.backend=fsdp2; resume it with that backend"):
        Checkpointer(cfg, members[0].engine, members, root).load_members(meta)


def test_no_function_outside_the_trainer_receives_it():
    """Components take what they use (preemption asks the checkpointer, the stacker gets its step
    and monitor): no function of fastwidth has a `trainer` parameter (13 had on the issue's main)."""
    import ast
    from pathlib import Path

    import fastwidth
    package = Path(fastwidth.__file__).parent
    taking = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                if any(a.arg == "trainer" for a in args):
                    taking.append(f"{path.relative_to(package)}:{node.name}")
    assert taking == []
