"""Seeds stacked (sweep.stack) vs one model at a time: the same optimizer steps of every member.

stacked: each width's members (its seeds) take their step as one batched model
(fastwidth/trainer/stacked.py); sequential (baseline): each model takes its steps alone, as
sweep.mode=sequential does. Two sweeps: 3 widths x 4 seeds of a µP MLP at widths 64-256, and
the demo GPT (configs/demo.yaml: 5 widths x 3 seeds). tokens/s = steps x examples (tokens for the
GPT) per step x models / wall seconds (extra_info). test_stacked_ratio alternates the two modes
round by round (A B C A B C, so the load of a shared machine hits all alike), with a third mode:
the widths sweep.stack=auto stacks; it records the ratios of the medians. The
pytest-benchmark pairs give the table.
"""
import os
import statistics
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from fastwidth.trainer.stacked import AUTO_MAX_ROWS_X_WIDTH

STEPS = 3
MLP = ["model.arch=mlp", "model.depth=2", "param.base_width=64", "data.source=synthetic", "data.in_dim=32",
       "data.num_classes=10", "data.batch_size=64", "data.probe_size=64", "sweep.widths=[64,128,256]",
       "sweep.seeds=[0,1,2,3]", "train.steps=100000", "stats.enabled=false", "train.out_dir=/tmp/fastwidth-bench-unused"]
DEMO = ["train.steps=100000", "stats.enabled=false", "train.out_dir=/tmp/fastwidth-bench-unused"]


def build(which: str):
    """A trainer-shaped object with the sweep's members, a Stacker over every width, and the stream."""
    from fastwidth.config import load_config, resolve
    from fastwidth.data import build_stream
    from fastwidth.trainer.loop import compiled_loss, make_members
    from fastwidth.trainer.stacked import Stacker
    cfg = resolve(load_config(str(ROOT / "configs/demo.yaml") if which == "gpt" else None, DEMO if which == "gpt" else MLP))
    stream = build_stream(cfg.data)
    members = make_members(cfg, stream, torch.device("cpu"))
    t = SimpleNamespace(cfg=cfg, members=members, placement=SimpleNamespace(k=1), evaluator=None,
                        loss_fns={m.name: compiled_loss(m.model, cfg) for m in members})
    t.train_step = lambda m, x, y: one_step(m, x, y, cfg, t.loss_fns[m.name])  # widths that do not stack
    stacker = Stacker(cfg, 1, lambda: torch.autocast("cpu", enabled=False), t.train_step)
    stacker.widths = {m.width for m in members}
    return cfg, stream, members, stacker


def one_step(m, x, y, cfg, loss_fn):
    """One member's optimizer step as Trainer.train_step takes it without statistics."""
    from fastwidth.parallel.engines import StepContext
    from fastwidth.param.optim import set_lr
    set_lr(m.optimizer, m.cfg.optim, m.step, cfg.train.steps)
    m.model.train()
    m.handle.train_step(x, y, 1, StepContext(), loss_fn)
    m.grad_norm = m.handle.grad_norm
    m.step += 1


def run_stacked(setup, start):
    cfg, stream, members, stacker = setup
    for s in range(start, start + STEPS):
        b = stream.batch(s)
        stacker.train(members, b["x"], b["y"])


def run_sequential(setup, start):
    cfg, stream, members, stacker = setup
    for m in members:
        for s in range(start, start + STEPS):
            b = stream.batch(s)
            stacker.train_alone(m, b["x"], b["y"])  # one_step with the member's loss_fn


def tokens(cfg, models: int) -> int:
    return STEPS * cfg.data.batch_size * (cfg.data.seq_len if cfg.model.arch == "gpt" else 1) * models


@pytest.fixture(scope="module", params=["mlp", "gpt"])
def setup(request):
    s = build(request.param)
    yield s
    s[3].close()


@pytest.mark.benchmark(group="train: stacked vs sequential")
@pytest.mark.parametrize("mode", ["stacked", "sequential"])
def test_stacked_steps(benchmark, setup, mode):
    cfg, _, members, _ = setup
    fn = run_stacked if mode == "stacked" else run_sequential
    rounds = iter(range(0, 100_000, STEPS))
    benchmark.pedantic(lambda: fn(setup, next(rounds)), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["sweep"] = cfg.model.arch
    benchmark.extra_info["tokens_per_s"] = tokens(cfg, len(members)) / benchmark.stats.stats.median


def _alternate(modes, rounds=4):
    """{mode: median seconds} over rounds 2.. of running every (name, prepare, fn) in turn;
    prepare() (restacking) runs outside the timing."""
    times = {name: [] for name, _, _ in modes}
    for r in range(rounds):
        for name, prepare, fn in modes:
            prepare()
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _rounds(cfg) -> int:
    """The MLP's 3 steps take ~20 ms: more rounds, so the medians hold through a loaded machine."""
    return 4 if cfg.model.arch == "gpt" else 16


def _stacked(setup, widths, batched, start):
    """(prepare, fn): stacked steps of `widths`' members, with the batched optimizer step or the
    members' own (the state before the batched step existed)."""
    stacker = setup[3]

    def prepare():
        if stacker.batched_step != batched:
            stacker.close()  # restack: the members' optimizer state is owned or stacked anew
            stacker.batched_step = batched
        stacker.widths = widths

    def fn():
        run_stacked(setup, start[0])
        start[0] += STEPS
    return prepare, fn


def test_stacked_ratio(setup, record_property):
    """Stacked (every width, with the members' own optimizer steps and with the batched step; then
    the widths sweep.stack=auto's rule picks) over sequential throughput, the modes alternating
    over _rounds(cfg) - 1 rounds after a warm-up round of each."""
    cfg, _, members, stacker = setup
    every = set(stacker.widths)
    rows = cfg.data.batch_size * (cfg.data.seq_len if cfg.model.arch == "gpt" else 1)
    auto = {w for w in every if rows * w <= AUTO_MAX_ROWS_X_WIDTH}  # sweep.stack=auto's rule
    start = [0]
    before = [m.step for m in members]

    def sequential():
        run_sequential(setup, start[0])
        start[0] += STEPS
    med = _alternate([("stacked_own_step", *_stacked(setup, every, False, start)),
                      ("stacked", *_stacked(setup, every, True, start)),
                      ("auto", *_stacked(setup, auto, True, start)),
                      ("sequential", lambda: None, sequential)], rounds=_rounds(cfg))
    stacker.widths = every
    for mode in ("stacked_own_step", "stacked", "auto"):
        record_property(f"{mode}_over_sequential", med["sequential"] / med[mode])
    print(f"\n{cfg.model.arch} {len(members)} models, s per {STEPS} steps: " + ", ".join(
        f"{k} {v:.3f}" for k, v in med.items()) + "; over sequential: " + ", ".join(
        f"{k} {med['sequential'] / med[k]:.2f}x" for k in ("stacked_own_step", "stacked", "auto"))
        + f" (auto stacks widths {sorted(auto)}); load {os.getloadavg()[0]:.1f}")
    assert [m.step - b for m, b in zip(members, before)] == [4 * _rounds(cfg) * STEPS] * len(members)


def test_stacked_ratio_per_width(setup, record_property):
    """Each width alone: its members stacked (batched step) over the same members one by one, the
    two alternating; the measurement behind AUTO_MAX_ROWS_X_WIDTH."""
    cfg, stream, members, stacker = setup
    rows = cfg.data.batch_size * (cfg.data.seq_len if cfg.model.arch == "gpt" else 1)
    widths = sorted({m.width for m in members})
    start, line = [0], []
    for w in widths:
        ms = [m for m in members if m.width == w]
        sub = (cfg, stream, ms, stacker)

        def sequential(sub=sub):
            run_sequential(sub, start[0])
            start[0] += STEPS
        med = _alternate([("stacked", *_stacked(sub, {w}, True, start)), ("sequential", lambda: None, sequential)],
                         rounds=_rounds(cfg))
        record_property(f"width_{w}_stacked_over_sequential", med["sequential"] / med["stacked"])
        line.append(f"{w} (rows x width {rows * w}): {med['sequential'] / med['stacked']:.2f}x "
                    f"({med['stacked']:.3f} vs {med['sequential']:.3f} s)")
    stacker.widths = {m.width for m in members}
    print(f"\n{cfg.model.arch} per width, stacked over sequential: " + "; ".join(line)
          + f"; load {os.getloadavg()[0]:.1f}")
