"""When the loop evaluates the probe: the one home of the evaluation schedule.

    schedule = EvalSchedule.from_config(cfg)   # stats.schedule, stats.every, stats.evals, train.steps
    schedule.due(step)                         # evaluate after this optimizer step?
    schedule.steps()                           # every evaluated step, 0 first and train.steps last

linear: every stats.every steps and the last. log: stats.evals steps spaced evenly in log tokens
(tokens are proportional to steps, so in log steps) between step 1 and train.steps; where the
geometric grid puts two points on one step at the start, the next integer steps take them, so the
first evaluations are steps 1, 2, 3, ... and the last is always train.steps. Both evaluate at step
0 too (before any update). The paper's early regime (an initialization-variance dip in the first
few million tokens) needs the log schedule: a linear one at the paper configs' cadence puts its
first point after it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


def log_steps(steps: int, evals: int) -> list[int]:
    """`evals` distinct steps in [1, steps], evenly spaced in log where the integers allow, the
    first ones 1, 2, 3, ... and the last `steps` (all of 1..steps when evals >= steps)."""
    if steps <= 0:
        return []
    if evals >= steps:
        return list(range(1, steps + 1))
    if evals <= 1:
        return [steps]
    # the next point sits on the geometric grid from the last one placed to `steps` (left - 1
    # intervals), or on the next integer where that grid is still finer than one step
    out: list[int] = []
    target = 1
    for k in range(evals):
        left = evals - k  # points still to place, this one included
        nxt = steps if left == 1 else min(max(target, out[-1] + 1 if out else 1), steps - (left - 1))
        out.append(nxt)
        if left > 1:
            target = int(round(nxt * (steps / nxt) ** (1.0 / (left - 1))))
    return out


@dataclass(frozen=True)
class EvalSchedule:
    total: int          # train.steps
    kind: str = "linear"
    every: int = 50
    evals: int = 24

    @classmethod
    def from_config(cls, cfg) -> "EvalSchedule":
        sc = cfg.stats
        return cls(total=int(cfg.train.steps), kind=sc.schedule, every=int(sc.every), evals=int(sc.evals))

    def steps(self) -> list[int]:
        """Every evaluated step, ascending: 0, the schedule's steps, train.steps."""
        if self.kind == "log":
            inner = log_steps(self.total, self.evals)
        else:
            inner = list(range(self.every, self.total + 1, self.every))
            if self.total > 0 and (not inner or inner[-1] != self.total):
                inner.append(self.total)
        return [0] + inner

    def due(self, step: int) -> bool:
        """Evaluate after optimizer step `step` (>= 1)? Step 0 is evaluated before training starts."""
        if step == self.total:
            return True
        if self.kind == "log":
            return step in self._log_set
        return step > 0 and step % self.every == 0

    @cached_property
    def _log_set(self) -> frozenset:
        return frozenset(log_steps(self.total, self.evals))
