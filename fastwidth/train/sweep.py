"""The members of a sweep beyond (width, seed): learning rates, and stopping the ones that diverge.

    specs = member_specs(cfg)                     # [(width, base_lr or None, seed)], reference width first
    guard = DivergenceGuard(cfg.train.diverge_factor)
    for m, reason in guard.check(members, losses): ...   # one host sync for every member's loss

With `sweep.lrs` every (width, lr, seed) is a member; all read the same batches (the stream does
not depend on the member), each has its own optimizer with optim.lr = lr, and its name
`w{width}_lr{lr:g}_s{seed}` stays unique. The statistics compare widths at one learning rate:
`LRMonitors` keeps one Monitor per learning rate, and every row it writes carries `base_lr`.

A member whose loss is not finite, or exceeds `diverge_factor` times its first loss, is stopped:
the loop spends no more compute on it, the monitor leaves it out of every later comparison, and a
row {"kind": "diverged", "step", "tokens", "width", "seed", "base_lr", "reason"} records why.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from fastwidth.config import Config, for_width


def member_specs(cfg: Config) -> list[tuple[int, float | None, int]]:
    """(width, base_lr, seed) of every member, the reference width first; base_lr is None without sweep.lrs."""
    ref = cfg.sweep.reference_width
    widths = [ref] + [w for w in cfg.sweep.widths if w != ref]
    lrs = [float(lr) for lr in cfg.sweep.lrs] or [None]
    return [(w, lr, s) for w in widths for lr in lrs for s in cfg.sweep.seeds]


def member_name(width: int, seed: int, base_lr: float | None = None) -> str:
    """w64_s0, or w64_lr0.001_s0 in a learning-rate sweep (the seed stays last: readers split on '_s')."""
    return f"w{width}_s{seed}" if base_lr is None else f"w{width}_lr{base_lr:g}_s{seed}"


def for_member(cfg: Config, width: int, base_lr: float | None) -> Config:
    """The config one member trains with: model.width = width and, in an LR sweep, optim.lr = base_lr."""
    wcfg = for_width(cfg, width)
    if base_lr is None:
        return wcfg
    return dataclasses.replace(wcfg, optim=dataclasses.replace(wcfg.optim, lr=float(base_lr)))


def divergence_reason(loss: float, first: float | None, factor: float) -> str | None:
    """Why `loss` counts as diverged (None when it does not): not finite, or above factor × the first loss."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if factor > 0 and first is not None and math.isfinite(first) and loss > factor * abs(first):
        return f"loss {loss:.4g} exceeds {factor:g} x the first loss {first:.4g}"
    return None


class DivergenceGuard:
    """Remembers each member's first loss and says which members diverged at this step."""

    def __init__(self, factor: float):
        self.factor = factor
        self.first: dict[str, float] = {}

    def check(self, members: list, losses: dict[str, torch.Tensor]) -> list[tuple[object, str, float]]:
        """(member, reason, loss) for every member in `losses` whose loss diverged."""
        names = [m.name for m in members if m.name in losses]
        if not names:
            return []
        values = torch.stack([losses[n].detach().float().reshape(()) for n in names]).tolist()  # one sync
        by_name = {m.name: m for m in members}
        out = []
        for name, v in zip(names, values):
            self.first.setdefault(name, v)
            reason = divergence_reason(v, self.first[name], self.factor)
            if reason is not None:
                out.append((by_name[name], reason, v))
        return out

    def state_dict(self) -> dict:
        return {"first": {k: (v if math.isfinite(v) else None) for k, v in self.first.items()}}

    def load_state_dict(self, d: dict) -> None:
        self.first = {k: (math.nan if v is None else float(v)) for k, v in d.get("first", {}).items()}


def diverged_row(m, reason: str, loss: float, tokens_per_step: int) -> dict:
    return {"kind": "diverged", "step": m.step, "tokens": m.step * tokens_per_step, "width": m.width,
            "seed": m.seed, "base_lr": m.cfg.optim.lr, "reason": reason, "loss": loss, "name": m.name}


def drop_member(monitor, m, announce: bool = True) -> None:
    """Leave a stopped member out of the monitor's later comparisons (ensembles, fits, references);
    announce: write the row saying so when it was its learning rate's last reference-width member
    (False on resume: the row was written when it diverged)."""
    for mon in getattr(monitor, "monitors", {}).values() or [monitor]:
        if m in mon.members:
            mon.drop(m, announce)


# --------------------------------------------------------------------------- one monitor per LR

class TaggedWriter:
    """A MetricsWriter that adds fixed keys (base_lr) to every row."""

    def __init__(self, writer, **tags):
        self.writer, self.tags = writer, tags

    def write(self, row: dict) -> None:
        self.writer.write({**row, **self.tags})

    def close(self) -> None:
        self.writer.close()


class LRMonitors:
    """The Monitor interface over one Monitor per learning rate (widths compared at equal lr)."""

    def __init__(self, make_monitor, members: list, writer):
        lrs = sorted({m.base_lr for m in members})
        self.monitors = {lr: make_monitor([m for m in members if m.base_lr == lr], TaggedWriter(writer, base_lr=lr))
                         for lr in lrs}
        self._of = {m.name: self.monitors[m.base_lr] for m in members}

    @property
    def acc(self) -> dict:
        return {k: v for mon in self.monitors.values() for k, v in mon.acc.items()}

    @property
    def probe_fn(self):
        return next(iter(self.monitors.values())).probe_fn

    @probe_fn.setter
    def probe_fn(self, fn) -> None:
        for mon in self.monitors.values():
            mon.probe_fn = fn

    @property
    def whole_of(self):
        return next(iter(self.monitors.values())).whole_of

    @whole_of.setter
    def whole_of(self, fn) -> None:
        for mon in self.monitors.values():
            mon.whole_of = fn

    @contextlib.contextmanager
    def paused(self):
        with contextlib.ExitStack() as stack:
            for mon in self.monitors.values():
                stack.enter_context(mon.paused())
            yield

    def training(self, member):
        return self._of[member.name].training(member)

    def evaluate(self, step: int, tokens: int, members: list | None = None) -> None:
        for lr, mon in self.monitors.items():
            subset = [m for m in members if m.base_lr == lr] if members is not None else None
            if subset is None or subset:
                mon.evaluate(step, tokens, subset)

    def flush_pending(self) -> None:
        for mon in self.monitors.values():
            mon.flush_pending()

    def close(self) -> None:
        for mon in self.monitors.values():
            mon.close()

    def state_dict(self) -> dict:
        return {repr(lr): mon.state_dict() for lr, mon in self.monitors.items()}

    def load_state_dict(self, d: dict) -> None:
        for lr, mon in self.monitors.items():
            if repr(lr) in d:
                mon.load_state_dict(d[repr(lr)])


# --------------------------------------------------------------------------- checkpoint state

def state(trainer) -> dict:
    """What a resume needs to go on stopping the same members: first losses and diverged rows."""
    stacker = getattr(trainer, "stacker", None)
    return {"guard": trainer.guard.state_dict(),
            "diverged": {m.name: m.diverged for m in trainer.members if m.diverged is not None},
            "stacked": sorted(stacker.widths) if stacker else []}  # a resume stacks the same widths


def restore(trainer, saved: dict) -> None:
    trainer.guard.load_state_dict(saved.get("guard", {}))
    for m in trainer.members:
        row = saved.get("diverged", {}).get(m.name)
        if row is not None:
            m.diverged = row
            drop_member(trainer.evaluator, m, announce=False)
