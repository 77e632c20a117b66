"""The statistics of a learning-rate sweep: one Monitor per learning rate, behind the Monitor's interface.

    monitor = monitor_for(cfg, run_dir, members, probe, writer, device, rank=r, world=w)

With `sweep.lrs` the statistics compare widths at one learning rate: `LRMonitors` keeps one Monitor
per learning rate, and one per refined (lr, width) of the second pass (`monitor_key`: a refined lr
exists at one width only, so it is its own reference, `monitor_config`), and every row it writes
carries `base_lr` (and `pass: "refine"` for the second pass: `pass_tag`). Without sweep.lrs,
monitor_for gives the one Monitor; the loop holds one object either way.
"""
from __future__ import annotations

import contextlib
import dataclasses

from fastwidth.config import Config
from fastwidth.run.metrics import REFINE
from fastwidth.stats.monitor import Monitor


def pass_tag(m) -> dict:
    """{"pass": "refine"} for a member of the refinement pass, {} for the first pass (rows as before)."""
    return {"pass": REFINE} if getattr(m, "pass_name", None) == REFINE else {}


class TaggedWriter:
    """A MetricsWriter that adds fixed keys (base_lr) to every row."""

    def __init__(self, writer, **tags):
        self.writer, self.tags = writer, tags

    def write(self, row: dict) -> None:
        self.writer.write({**row, **self.tags})

    def close(self) -> None:
        self.writer.close()


def monitor_key(m):
    """Which Monitor a member reports to: its learning rate (widths compared at equal lr), or for a
    refined member (lr, width): a refined lr exists at one width, so it is compared with nothing."""
    return (m.base_lr, m.width) if pass_tag(m) else m.base_lr


def monitor_config(cfg: Config, members: list) -> Config:
    """The config a Monitor of `members` runs with: a refined (lr, width) group is its own reference."""
    if not pass_tag(members[0]):
        return cfg
    return dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, reference_width=members[0].width))


def monitor_for(cfg: Config, run_dir, members: list, probe: dict, writer, device, **options):
    """The run's statistics: a Monitor of `members`, or with sweep.lrs an LRMonitors of one per
    learning rate; options: Monitor's keyword arguments (ranges_dir, train_batch, rank, world,
    whole_of), the same for every learning rate."""
    if not cfg.sweep.lrs:
        return Monitor(cfg, run_dir, members, probe, writer, device, **options)
    return LRMonitors(lambda ms, w: Monitor(monitor_config(cfg, ms), run_dir, ms, probe, w, device, **options),
                      members, writer)


class LRMonitors:
    """The Monitor interface over one Monitor per learning rate (widths compared at equal lr), and
    one per refined (lr, width) (monitor_key); `add` gives the refinement pass's members theirs.
    make_monitor(members, writer) -> Monitor. The cross-rank methods run each Monitor's collectives
    in one order, the same on every rank (every rank holds the same members)."""

    def __init__(self, make_monitor, members: list, writer):
        self.make_monitor, self.writer = make_monitor, writer
        self.monitors: dict = {}
        self._of: dict = {}
        self.add(members)

    def add(self, members: list) -> None:
        groups: dict = {}
        for m in members:
            groups.setdefault(monitor_key(m), []).append(m)
        for key in sorted(groups, key=lambda k: (isinstance(k, tuple), k)):
            ms = groups[key]
            self.monitors[key] = self.make_monitor(ms, TaggedWriter(self.writer, base_lr=ms[0].base_lr, **pass_tag(ms[0])))
        self._of.update({m.name: self.monitors[monitor_key(m)] for m in members})

    def _split(self, members: list | None):
        """(Monitor, its members among `members`, None: all) for every Monitor with some."""
        for key, mon in self.monitors.items():
            subset = None if members is None else [m for m in members if monitor_key(m) == key]
            if subset is None or subset:
                yield mon, subset

    @contextlib.contextmanager
    def paused(self):
        with contextlib.ExitStack() as stack:
            for mon in self.monitors.values():
                stack.enter_context(mon.paused())
            yield

    def training(self, member):
        return self._of[member.name].training(member)

    def evaluate(self, step: int, tokens: int, members: list | None = None) -> None:
        for mon, subset in self._split(members):
            mon.evaluate(step, tokens, subset)

    def flush_pending(self) -> None:
        for mon in self.monitors.values():
            mon.flush_pending()

    def drop(self, m, announce: bool = True) -> None:
        self._of[m.name].drop(m, announce)

    def sync_preacts(self, members: list | None = None) -> None:
        for mon, subset in self._split(members):
            mon.sync_preacts(subset)

    def sync_ranges(self) -> None:
        for mon in self.monitors.values():
            mon.sync_ranges()

    def keep_on_main(self) -> None:
        for mon in self.monitors.values():
            mon.keep_on_main()

    def close(self) -> None:
        for mon in self.monitors.values():
            mon.close()

    def state_dict(self) -> dict:
        return {repr(key): mon.state_dict() for key, mon in self.monitors.items()}

    def load_state_dict(self, d: dict) -> None:
        for key, mon in self.monitors.items():
            if repr(key) in d:
                mon.load_state_dict(d[repr(key)])
