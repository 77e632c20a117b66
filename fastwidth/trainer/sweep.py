"""The members of a sweep beyond (width, seed): learning rates, and stopping the ones that diverge.

    specs = member_specs(cfg)                     # [(width, base_lr or None, seed)], reference width first
    guard = DivergenceGuard(cfg.train.diverge_factor)
    for m, reason in guard.check(members, losses): ...   # one host sync for every member's loss

With `sweep.lrs` every (width, lr, seed) is a member; all read the same batches (the stream does
not depend on the member), each has its own optimizer with optim.lr = lr, and its name
`w{width}_lr{lr:g}_s{seed}` stays unique. The statistics compare widths at one learning rate:
stats/lr_groups.py's `LRMonitors` keeps one Monitor per learning rate, and every row it writes
carries `base_lr`.

With `sweep.depths` every (width, depth, lr, seed) is a member (run/members.py, `w64_d4_s0`), its
config at its depth (for_member), its depth in its init seed (param/scaling.init_depth), and every
row it writes carries `depth` (stats/lr_groups.member_tags, depth_tag); the statistics compare
widths at each depth and depths at each width (stats/lr_groups.py, stats/across_depth.py).

With `sweep.lr_refine: K` a second pass follows: once every member has reached train.steps, the
coarse pass's final losses (`final_losses`: the probe loss of the last evaluation, else the mean
training loss of the last 10% of steps) give each width's grid argmin, stats/transfer.refine_lrs
gives K learning rates around it, and `refine_specs` makes them members at every seed. They are
built and trained like the first (the loop's own machinery, from step 0 on the same stream: the
same batches and, since a member's init depends on (seed, width) and not its learning rate, the
same initial weights as the coarse members of their width and seed) and carry `pass_name`
"refine": their rows say `pass: "refine"`, and their statistics are kept per (lr, width) (a
refined lr exists at one width only, so there is no other width to compare it with). A
checkpoint after the first pass and every later one (which lists the refined specs) make
train.resume work across the two passes; one checkpoint holds both passes' members (load_model
reaches a refined one by its name). A resume with a larger train.steps keeps the refined learning
rates picked at the first end and trains both passes on.

A member whose loss is not finite, or exceeds `diverge_factor` times its first loss, is stopped:
the loop spends no more compute on it, the monitor leaves it out of every later comparison, and a
row {"kind": "diverged", "step", "tokens", "width", "seed", "base_lr", "reason"} records why.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastwidth.config import Config
from fastwidth.run.members import MemberSpec, member_config, member_specs as sweep_member_specs
from fastwidth.run.metrics import REFINE
from fastwidth.stats.lr_groups import depth_tag, pass_tag
from fastwidth.stats.transfer import refine_lrs

FINAL_WINDOW = 0.1   # stats off: a member's final loss is its mean training loss over the last 10% of steps


def member_specs(cfg: Config) -> list[tuple[int, float | None, int]]:
    """(width, base_lr, seed) of every member, the reference width first; base_lr is None without sweep.lrs."""
    return [(m.width, m.lr, m.seed) for m in sweep_member_specs(cfg)]


def member_name(width: int, seed: int, base_lr: float | None = None, depth: int | None = None) -> str:
    """w64_s0, w64_lr0.001_s0 in a learning-rate sweep, w64_d4_s0 in a depth sweep (the seed stays
    last: readers split on '_s')."""
    return MemberSpec(width, base_lr, seed, depth).name


for_member = member_config   # (cfg, width, base_lr, depth=None) -> the member's config (run/members.py)


def final_losses(rows: list[dict], steps: int) -> dict[tuple[int, float, int], float]:
    """{(width, base_lr, seed): loss} of the first pass's members at its end, the number the report's
    last budget reads (report/transfer.py): the probe loss of the evaluation at `steps`, or without
    evaluations the mean training loss over the last FINAL_WINDOW of steps; +inf when it diverged."""
    first = [r for r in rows if r.get("pass") != REFINE and r.get("base_lr") is not None]
    out = {(r["width"], r["base_lr"], r["seed"]): r["probe_loss"] for r in first
           if r.get("kind") == "eval" and r.get("step") == steps and isinstance(r.get("probe_loss"), (int, float))}
    if not out:
        acc: dict[tuple, list[float]] = {}
        for r in first:
            if r.get("kind") == "train" and r["step"] > (1 - FINAL_WINDOW) * steps and isinstance(r.get("loss"), (int, float)):
                acc.setdefault((r["width"], r["base_lr"], r["seed"]), []).append(r["loss"])
        out = {k: sum(v) / len(v) for k, v in acc.items()}
    out.update({(r["width"], r["base_lr"], r["seed"]): math.inf for r in first if r.get("kind") == "diverged"})
    return out


def _seed_mean(values: list[float]) -> float:
    """Mean over seeds; inf when one diverged (as stats/transfer.py counts it), nan when none has a loss."""
    if any(v == math.inf for v in values):
        return math.inf
    ok = [v for v in values if math.isfinite(v)]
    return sum(ok) / len(ok) if ok else math.nan


def refine_specs(cfg: Config, rows: list[dict]) -> list[tuple[int, float, int]]:
    """(width, base_lr, seed) of the refinement pass: sweep.lr_refine learning rates around each
    width's argmin of the first pass's seed-mean final loss, at every seed, in member_specs' order."""
    lrs = sorted(float(lr) for lr in cfg.sweep.lrs)
    widths = list(dict.fromkeys(w for w, _, _ in member_specs(cfg)))
    got = final_losses(rows, cfg.train.steps)
    y = np.array([[_seed_mean([got.get((w, lr, s), math.nan) for s in cfg.sweep.seeds]) for lr in lrs] for w in widths])
    picks = refine_lrs(lrs, y, cfg.sweep.lr_refine)
    return [(w, lr, s) for w, add in zip(widths, picks) for lr in add if lr not in lrs for s in cfg.sweep.seeds]


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
            "seed": m.seed, "base_lr": m.cfg.optim.lr, "reason": reason, "loss": loss, "name": m.name,
            **pass_tag(m), **depth_tag(m)}


def drop_member(monitor, m, announce: bool = True) -> None:
    """Leave a stopped member out of the monitor's later comparisons (ensembles, fits, references);
    announce: write the row saying so when it was its learning rate's last reference-width member
    (False on resume: the row was written when it diverged)."""
    monitor.drop(m, announce)


# --------------------------------------------------------------------------- checkpoint state

def state(guard: DivergenceGuard, members: list, stacker) -> dict:
    """What a resume needs to go on stopping the same members (first losses and diverged rows),
    stacking the same widths (stacker: the loop's, None when none) and training the same refined
    members."""
    return {"guard": guard.state_dict(),
            "diverged": {m.name: m.diverged for m in members if m.diverged is not None},
            "stacked": sorted(stacker.widths) if stacker else [],  # a resume stacks the same widths
            "refine": [[m.width, m.base_lr, m.seed] for m in members if pass_tag(m)]}


def pass_floors(members: list, meta: dict | None) -> dict:
    """{row "pass": the smallest step of its members still training} (None: the first pass), where a
    resume cuts the rows of no member (ensembles, fits) of each pass: a member stopped for divergence
    at step 2 must not cut the others' ensemble rows there. Refinement rows without refined members
    in the checkpoint are from an attempt that did not reach one: all go (floor -1). meta: the
    checkpoint resumed from (its sweep state names the stopped members)."""
    stopped = set((meta or {}).get("sweep", {}).get("diverged") or {})
    out: dict = {}
    for m in [m for m in members if m.name not in stopped] or members:
        key = pass_tag(m).get("pass")
        out[key] = min(out.get(key, m.step), m.step)
    return {REFINE: -1, **out}


def saved_refine_specs(meta: dict | None) -> list[tuple[int, float, int]]:
    """The refinement pass's (width, base_lr, seed) a checkpoint holds (none before that pass began)."""
    return [(int(w), float(lr), int(s)) for w, lr, s in ((meta or {}).get("sweep", {}).get("refine") or [])]


def saved_stacked(meta: dict | None) -> set[int] | None:
    """The widths the run of checkpoint meta stacked (None when not resuming, or from a checkpoint
    written before the sweep state held them)."""
    saved = (meta or {}).get("sweep", {})
    return set(saved["stacked"]) if "stacked" in saved else None


def restore(saved: dict, guard: DivergenceGuard, members: list, monitor) -> None:
    """state()'s inverse: the guard's first losses back, and each member stopped before the
    checkpoint stopped again and left out of the monitor's comparisons."""
    guard.load_state_dict(saved.get("guard", {}))
    for m in members:
        row = saved.get("diverged", {}).get(m.name)
        if row is not None:
            m.diverged = row
            drop_member(monitor, m, announce=False)
