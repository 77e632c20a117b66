"""Lock-step members of one width trained as one stacked model (sweep.stack; models/stacked.py).

    stacker = plan(trainer)                      # None: every member trains alone
    losses = stacker.train(due, x, y)            # {member name: loss}, as Trainer.train_step's

The S members of one width (its seeds and learning rates) share every batch, so their forward
and backward run as one batched model: one GEMM per layer instead of S small ones. What stays
per member: the optimizer and its learning rate schedule, gradient clipping (the norm of the
member's own gradient), the gradient norm in train rows, checkpoints, signatures and every
statistic (the member modules' parameters are views of the stacked ones).

sweep.stack: off (false) trains members one by one; on (true) stacks every width that can; auto times one
forward and backward of the first batch both ways at start and stacks a width where it is faster
(stacking loses at large widths, where one GEMM already fills the cores: 0.83x at width 1024 in
the issue's measurement). A resume stacks the widths the checkpoint's run stacked (sweep state),
so resumed numbers equal uninterrupted ones; two fresh auto runs may choose differently and then
agree within 1e-6 rather than bit for bit (sweep.stack=true or false for bit-equal reruns). A
member that diverges leaves its width's stack: the others restack.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch

from fastwidth.models.stacked import Stack, refusal, why_not
from fastwidth.parallel.engines import StepContext, accumulate, clip_grad
from fastwidth.param.optim import set_lr

log = logging.getLogger("fastwidth.train")

# auto stacks a width when its stacked step takes under this share of the one-by-one steps:
# below it the difference is within the probe's noise on a loaded machine (±5% between repeats)
AUTO_MARGIN = 0.95


def by_width(members: list) -> dict[int, list]:
    out: dict[int, list] = {}
    for m in members:
        out.setdefault(m.width, []).append(m)
    return out


def plan(trainer, autocast) -> "Stacker | None":
    """The widths that train stacked, decided once at start and said in the log; autocast() is
    the context of each forward (the loop's precision)."""
    cfg = trainer.cfg
    mode = {True: "on", False: "off"}.get(cfg.sweep.stack, cfg.sweep.stack)  # YAML reads on/off as booleans
    if mode == "off":
        return None
    say = log.warning if mode == "on" else log.info
    why = refusal(cfg)
    if why is not None and cfg.sweep.mode == "sequential":
        return None  # nothing to stack: one member trains at a time
    if why is not None:
        say("sweep.stack=%s: every member trains on its own (%s)", mode, why)
        return None
    stacker = Stacker(trainer, autocast)
    meta = trainer.resume_meta or {}
    saved = set(meta["sweep"]["stacked"]) if "stacked" in meta.get("sweep", {}) else None
    x, y = trainer.batch(min(m.step for m in trainer.members))
    for width, ms in by_width(trainer.active(trainer.members)).items():
        if len(ms) < 2:
            continue
        why = why_not([m.model for m in ms])
        if why is not None:
            say("sweep.stack=%s: width %d trains its %d members on their own (%s)", mode, width, len(ms), why)
            continue
        if mode == "auto" and saved is not None:  # resuming: the first run's choice, so the numbers match
            if width not in saved:
                continue
        elif mode == "auto":
            t_stack, t_each = stacker.probe(ms, x, y)
            stacked = t_stack < AUTO_MARGIN * t_each
            log.info("sweep.stack=auto: width %d %s (forward+backward of %d members: stacked %.1f ms, "
                     "one by one %.1f ms)", width, "stacked" if stacked else "one by one", len(ms),
                     1e3 * t_stack, 1e3 * t_each)
            if not stacked:
                stacker.release(width)
                continue
        stacker.widths.add(width)
    if not stacker.widths:
        return None
    log.info("sweep.stack=%s: widths %s train stacked", mode, sorted(stacker.widths))
    return stacker


class Stacker:
    """Trains the due members of the stacked widths together, the rest through trainer.train_step."""

    def __init__(self, trainer, autocast):
        self.trainer, self.autocast = trainer, autocast
        self.widths: set[int] = set()
        self.stacks: dict[int, tuple[tuple[str, ...], Stack]] = {}

    def _stack(self, ms: list) -> Stack:
        names = tuple(m.name for m in ms)
        held = self.stacks.get(ms[0].width)
        if held is not None and held[0] == names:
            return held[1]
        if held is not None:  # a member stopped (diverged): the others restack without it
            held[1].unstack()
        stack = Stack([m.model for m in ms])
        self.stacks[ms[0].width] = (names, stack)
        return stack

    def release(self, width: int) -> None:
        held = self.stacks.pop(width, None)
        if held is not None:
            held[1].unstack()

    def close(self) -> None:
        for width in list(self.stacks):
            self.release(width)

    def probe(self, ms: list, x, y, repeats: int = 2) -> tuple[float, float]:
        """Seconds of one forward+backward of `ms` stacked and one by one (best of `repeats`
        after a warm-up); gradients are discarded, parameters untouched, hooks see nothing."""
        t = self.trainer
        x, y = x.chunk(t.placement.k)[0], y.chunk(t.placement.k)[0]  # one micro-batch, as trained
        stack = self._stack(ms)
        fwd = self.autocast
        paused = t.evaluator.paused if t.cfg.stats.enabled else contextlib.nullcontext
        best = [float("inf"), float("inf")]
        with paused():
            for r in range(repeats + 1):
                t0 = time.perf_counter()
                with fwd():
                    loss = stack.losses(x, y).sum()
                loss.backward()
                stack.grads_to_members()
                _clear(ms)
                t1 = time.perf_counter()
                for m in ms:
                    with fwd():
                        loss = t.loss_fns[m.name](x, y)
                    loss.backward()
                _clear(ms)
                t2 = time.perf_counter()
                if r:
                    best = [min(best[0], t1 - t0), min(best[1], t2 - t1)]
        return best[0], best[1]

    def train(self, due: list, x, y) -> dict:
        """One optimizer step of every member in `due` on (x, y); {name: loss tensor}."""
        out = {}
        for width, ms in by_width(due).items():
            if width in self.widths and len(ms) > 1:
                out.update(self._step(ms, x, y))
            else:
                if width in self.stacks:
                    self.release(width)  # one member left: it trains on its own storage
                out.update({m.name: self.trainer.train_step(m, x, y) for m in ms})
        return {m.name: out[m.name] for m in due}

    def _step(self, ms: list, x, y) -> dict:
        t = self.trainer
        cfg = t.cfg
        for m in ms:
            set_lr(m.optimizer, m.cfg.optim, m.step, cfg.train.steps)
            m.model.train()
        stack = self._stack(ms)
        stats = cfg.stats.enabled
        stack.tapping = stats and cfg.stats.preact
        ctx = StepContext(self.autocast)
        k = t.placement.k
        losses = accumulate(stack.losses, lambda l: (l.sum() / k).backward(), x, y, k, ctx)  # (S,)
        stack.grads_to_members()
        if stats:  # the preactivation hooks of each member, on its slices (every micro-batch)
            for i, m in enumerate(ms):
                with t.evaluator.training(m):
                    stack.replay_hooks(i)
            stack.clear_taps()
        for m in ms:
            m.grad_norm = clip_grad(list(m.model.parameters()), m.cfg.optim.grad_clip, measure=True)
            m.optimizer.step()
            m.optimizer.zero_grad(set_to_none=True)
            m.step += 1
        return {m.name: losses[i] for i, m in enumerate(ms)}


def _clear(ms: list) -> None:
    for m in ms:
        for p in m.model.parameters():
            p.grad = None
