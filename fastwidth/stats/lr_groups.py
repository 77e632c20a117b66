"""The statistics of a learning-rate or depth sweep: one Monitor per group, behind the Monitor's interface.

    monitor = monitor_for(cfg, run_dir, members, probe, writer, device, rank=r, world=w)

With `sweep.lrs` the statistics compare widths at one learning rate: `LRMonitors` keeps one Monitor
per learning rate, and one per refined (lr, width) of the second pass (`monitor_key`: a refined lr
exists at one width only, so it is its own reference, `monitor_config`), and every row it writes
carries `base_lr` (and `pass: "refine"` for the second pass: `pass_tag`). With `sweep.depths` it
keeps one Monitor per (lr, depth), comparing widths at that depth (its rows carry `depth`, and its
consistency, ensemble and fit rows `ref_depth` = depth and `"axis": "width"`), and one
stats/across_depth.py DepthAxis per (lr, width), comparing each depth with the reference depth
(rows with `"axis": "depth"`). The Monitors of a depth sweep share one set of histogram bins,
the deepest depth's (its layers include every shallower depth's): preact_ranges.json holds every
layer a resume needs. Without sweep.lrs and sweep.depths, monitor_for gives the one Monitor; the
loop holds one object either way.
"""
from __future__ import annotations

import contextlib
import dataclasses

from fastwidth.config import Config
from fastwidth.run.members import reference_depth
from fastwidth.run.metrics import REFINE
from fastwidth.stats.across_depth import DepthAxis
from fastwidth.stats.monitor import Monitor


def pass_tag(m) -> dict:
    """{"pass": "refine"} for a member of the refinement pass, {} for the first pass (rows as before)."""
    return {"pass": REFINE} if getattr(m, "pass_name", None) == REFINE else {}


def depth_tag(m) -> dict:
    """{"depth": d} for a member of a depth sweep, {} otherwise (rows as before)."""
    depth = getattr(m, "depth", None)
    return {} if depth is None else {"depth": depth}


def member_tags(m) -> dict:
    """The keys a member's rows carry besides width and seed: base_lr in a learning-rate sweep,
    depth in a depth sweep (none outside both)."""
    return {**({} if m.base_lr is None else {"base_lr": m.base_lr}), **depth_tag(m)}


COMPARED_KINDS = ("consistency", "ensemble", "fit")


class TaggedWriter:
    """A MetricsWriter that adds fixed keys (base_lr, depth) to every row, and `compared` keys
    (ref_depth, axis) to the comparison rows (COMPARED_KINDS)."""

    def __init__(self, writer, compared: dict | None = None, **tags):
        self.writer, self.tags, self.compared = writer, tags, compared or {}

    def write(self, row: dict) -> None:
        extra = self.compared if row.get("kind") in COMPARED_KINDS else {}
        self.writer.write({**row, **self.tags, **extra})

    def close(self) -> None:
        self.writer.close()


def monitor_key(m):
    """Which Monitor a member reports to: its learning rate (widths compared at equal lr), in a
    depth sweep ("depth", lr, depth), or for a refined member (lr, width): a refined lr exists at
    one width, so it is compared with nothing."""
    if pass_tag(m):
        return (m.base_lr, m.width)
    return m.base_lr if getattr(m, "depth", None) is None else ("depth", m.base_lr, m.depth)


def monitor_config(cfg: Config, members: list) -> Config:
    """The config a Monitor of `members` runs with: a refined (lr, width) group is its own reference."""
    if not pass_tag(members[0]):
        return cfg
    return dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, reference_width=members[0].width))


def monitor_for(cfg: Config, run_dir, members: list, probe: dict, writer, device, **options):
    """The run's statistics: a Monitor of `members`, or with sweep.lrs or sweep.depths an LRMonitors
    of one per group; options: Monitor's keyword arguments (ranges_dir, train_batch, rank, world,
    whole_of), the same for every group."""
    if not cfg.sweep.lrs and not cfg.sweep.depths:
        return Monitor(cfg, run_dir, members, probe, writer, device, **options)
    groups = LRMonitors(lambda ms, w: Monitor(monitor_config(cfg, ms), run_dir, ms, probe, w, device, **options),
                        members, writer)
    if cfg.sweep.depths:
        groups.add_depth_axes(members, reference_depth(cfg), run_dir, cfg.stats.bootstrap)
    return groups


class LRMonitors:
    """The Monitor interface over one Monitor per learning rate (widths compared at equal lr), one
    per (lr, depth) in a depth sweep with a DepthAxis per (lr, width), and one per refined (lr,
    width) (monitor_key); `add` gives the refinement pass's members theirs. make_monitor(members,
    writer) -> Monitor. The cross-rank methods run each Monitor's collectives in one order, the
    same on every rank (every rank holds the same members)."""

    def __init__(self, make_monitor, members: list, writer):
        self.make_monitor, self.writer = make_monitor, writer
        self.monitors: dict = {}
        self._of: dict = {}
        self.axes: dict = {}   # (lr, width) -> DepthAxis (sweep.depths)
        self.add(members)

    def add(self, members: list) -> None:
        groups: dict = {}
        for m in members:
            groups.setdefault(monitor_key(m), []).append(m)
        for key in sorted(groups, key=lambda k: (isinstance(k, tuple), k)):
            ms = groups[key]
            lr = {} if ms[0].base_lr is None else {"base_lr": ms[0].base_lr}
            depth = depth_tag(ms[0])
            compared = {"ref_depth": depth["depth"], "axis": "width"} if depth else None
            self.monitors[key] = self.make_monitor(ms, TaggedWriter(self.writer, compared, **lr, **pass_tag(ms[0]),
                                                                    **depth))
        self._of.update({m.name: self.monitors[monitor_key(m)] for m in members})

    def add_depth_axes(self, members: list, ref_depth: int, run_dir, n_boot: int) -> None:
        """One DepthAxis per (lr, width) of a depth sweep, on the bins every Monitor shares."""
        centers = next(iter(self.monitors.values())).hist_centers
        groups: dict = {}
        for m in members:
            groups.setdefault((m.base_lr, m.width), []).append(m)
        for (lr, width), ms in groups.items():
            tags = {} if lr is None else {"base_lr": lr}
            self.axes[(lr, width)] = DepthAxis(ms, ref_depth, run_dir, TaggedWriter(self.writer, **tags), centers, n_boot)

    def _share_bins(self) -> None:
        """A depth sweep's first evaluation (stats.hist_range 0): the deepest Monitor sets the bins
        from its reference-width members and every other Monitor takes them (module docstring)."""
        if not self.axes or all(mon.ranges is not None or mon.sc.hist_range > 0 for mon in self.monitors.values()):
            return
        deepest = max(self.monitors.values(), key=lambda mon: max(m.depth for m in mon.members))
        deepest._set_ranges(deepest.members)
        for mon in self.monitors.values():
            if mon is not deepest:
                mon.ranges = deepest.ranges
                mon._make_accumulators()

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
        self._share_bins()
        for mon, subset in self._split(members):
            mon.evaluate(step, tokens, subset)
        for (lr, width), axis in self.axes.items():
            if members is None or any(m.base_lr == lr and m.width == width for m in members):
                axis.evaluated(step, tokens)

    def flush_pending(self) -> None:
        for mon in self.monitors.values():
            mon.flush_pending()

    def drop(self, m, announce: bool = True) -> None:
        self._of[m.name].drop(m, announce)
        for axis in self.axes.values():
            axis.drop(m)

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
        return {**{repr(key): mon.state_dict() for key, mon in self.monitors.items()},
                **{f"depth_axis {key!r}": axis.state_dict() for key, axis in self.axes.items()}}

    def load_state_dict(self, d: dict) -> None:
        for key, mon in self.monitors.items():
            if repr(key) in d:
                mon.load_state_dict(d[repr(key)])
        for key, axis in self.axes.items():
            if f"depth_axis {key!r}" in d:
                axis.load_state_dict(d[f"depth_axis {key!r}"])
