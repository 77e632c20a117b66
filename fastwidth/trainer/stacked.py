"""Lock-step members of one width trained as one stacked model (sweep.stack; models/stacked.py).

    stacker = plan(Stacker(cfg, k, autocast, train_alone, monitor), members, saved)   # None: each trains alone
    losses = stacker.train(due, x, y)            # {member name: loss}, as train_alone's

The S members of one width (its seeds and learning rates) share every batch, so their forward
and backward run as one batched model: one GEMM per layer instead of S small ones. What stays
per member: the optimizer (its state entries, learning rate schedule and state_dict), gradient
clipping (the norm of the member's own gradient), the gradient norm in train rows, checkpoints,
signatures and every statistic (the member modules' parameters, and their Adam moments, are views
of the stacked ones). The clip and the Adam(W) update run once over the stacked tensors
(param/stacked_optim.py: one fused call per parameter group, or per member and group where the
members' learning rates differ); an optimizer it does not cover (SGD) steps per member, said once
in the log.

sweep.stack: off (false) trains members one by one; on (true) stacks every width that can; auto
stacks a width where one member's rows x width is at most AUTO_MAX_ROWS_X_WIDTH (stacking loses
at large widths, where one GEMM already fills the cores: 0.83x at width 1024 in the issue's
measurement). A resume stacks the widths the checkpoint's run stacked (sweep state). Stacked
members agree with members trained alone within 1e-6, not bit for bit (bmm rounds differently
from mm). A member that diverges leaves its width's stack: the others restack.
"""
from __future__ import annotations

import logging

from fastwidth.models.stacked import Stack, refusal, why_not
from fastwidth.parallel.engines import StepContext, accumulate, clip_grad
from fastwidth.param.optim import set_lr
from fastwidth.param.stacked_optim import StackedStep, why_not as no_stacked_step

log = logging.getLogger("fastwidth.trainer")

# auto stacks a width when one member's micro-batch rows (tokens for the GPT) x width is at most
# this: where each GEMM is small, stacking saves launches and per-op overhead; where it is large
# the step is bound by arithmetic that stacking cannot reduce, and bmm (and elementwise ops on S
# times the bytes) run slower than the members' own ops. Measured on 2 CPU cores (timing probe,
# forward+backward, demo GPT, 1024 rows): width 16 stacked 4.0x faster, 32 1.4x, 64 0.97x, 128
# 0.92x, 256 0.88x; µP MLP at 64 rows, widths 64-256: 2.2x. Re-measured with the batched optimizer
# step and the per-member fused readout (whole optimizer steps, stacked vs one by one alternating,
# 2 loaded CPU cores, 3-4 seeds): demo GPT width 32 (rows x width 32768) 1.12-1.19x, 64 (65536)
# 0.87-1.04x, 128 0.86-0.89x, 256 0.84-0.89x; µP MLP at 64 rows width 256 (16384) 1.84-2.10x,
# 512 (32768) 1.13x, 1024 (65536) 0.36x, 2048 0.31x: the break-even lies between 2^15 and 2^16 in
# both, so the rule stays. A fixed rule rather than a probe at start, so two runs of one config
# compute the same bits.
AUTO_MAX_ROWS_X_WIDTH = 1 << 15


def by_width(members: list) -> dict[int, list]:
    out: dict[int, list] = {}
    for m in members:
        out.setdefault(m.width, []).append(m)
    return out


def plan(stacker: "Stacker", members: list, saved: set[int] | None) -> "Stacker | None":
    """The widths of `members` (those still training) that train stacked, decided once at start
    and said in the log: `stacker` with its widths, or None. saved: the widths a resumed
    checkpoint's run stacked (None when not resuming)."""
    cfg = stacker.cfg
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
    rows = cfg.data.batch_size // stacker.micro_steps * (cfg.data.seq_len if cfg.model.arch == "gpt" else 1)
    for width, ms in by_width(members).items():
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
            size = rows * width
            stacked = size <= AUTO_MAX_ROWS_X_WIDTH
            log.info("sweep.stack=auto: width %d %s (%d members; rows x width = %d %s %d, the break-even "
                     "measured on CPU)", width, "stacked" if stacked else "one by one", len(ms), size,
                     "<=" if stacked else ">", AUTO_MAX_ROWS_X_WIDTH)
            if not stacked:
                continue
        stacker.widths.add(width)
    if not stacker.widths:
        return None
    log.info("sweep.stack=%s: widths %s train stacked", mode, sorted(stacker.widths))
    return stacker


class Stacker:
    """Trains the due members of the stacked widths together, the rest through train_alone(m, x, y)
    (the loop's one-member step). micro_steps: micro-batches per optimizer step; autocast() the
    context of each forward (the loop's precision); monitor: whose training hooks see each member's
    preactivations (None with statistics off)."""

    def __init__(self, cfg, micro_steps: int, autocast, train_alone, monitor=None):
        self.cfg, self.micro_steps, self.autocast = cfg, micro_steps, autocast
        self.train_alone, self.monitor = train_alone, monitor
        self.widths: set[int] = set()
        self.stacks: dict[int, tuple[tuple[str, ...], Stack, StackedStep | None]] = {}
        self.said = False  # the per-member optimizer fallback is logged once
        self.batched_step = True  # False: every member its own clip and Optimizer.step (the benchmark's before)

    def _stack(self, ms: list) -> tuple[Stack, StackedStep | None]:
        names = tuple(m.name for m in ms)
        held = self.stacks.get(ms[0].width)
        if held is not None and held[0] == names:
            return held[1], held[2]
        if held is not None:  # a member stopped (diverged): the others restack without it
            self.release(ms[0].width)
        stack = Stack([m.model for m in ms])
        optimizers = [m.optimizer for m in ms]
        why = no_stacked_step(optimizers) if self.batched_step else "the batched step is off"
        if why is None and len({m.cfg.optim.grad_clip for m in ms}) > 1:
            why = "the members' optim.grad_clip differ"
        if why is not None and not self.said:
            log.info("sweep.stack: each member takes its own optimizer step (%s)", why)
            self.said = True
        step = StackedStep(stack.params, stack.member_params, optimizers) if why is None else None
        self.stacks[ms[0].width] = (names, stack, step)
        return stack, step

    def release(self, width: int) -> None:
        held = self.stacks.pop(width, None)
        if held is not None:
            if held[2] is not None:
                held[2].release()
            held[1].unstack()

    def close(self) -> None:
        for width in list(self.stacks):
            self.release(width)

    def train(self, due: list, x, y) -> dict:
        """One optimizer step of every member in `due` on (x, y); {name: loss tensor}."""
        out = {}
        for width, ms in by_width(due).items():
            if width in self.widths and len(ms) > 1:
                out.update(self._step(ms, x, y))
            else:
                if width in self.stacks:
                    self.release(width)  # one member left: it trains on its own storage
                out.update({m.name: self.train_alone(m, x, y) for m in ms})
        return {m.name: out[m.name] for m in due}

    def _step(self, ms: list, x, y) -> dict:
        cfg = self.cfg
        for m in ms:
            set_lr(m.optimizer, m.cfg.optim, m.step, cfg.train.steps)
            m.model.train()
        stack, step = self._stack(ms)
        stats = cfg.stats.enabled
        stack.tapping = stats and cfg.stats.preact
        ctx = StepContext(self.autocast)
        k = self.micro_steps
        losses = accumulate(stack.losses, lambda l: (l.sum() / k).backward(), x, y, k, ctx)  # (S,)
        if step is None:
            stack.grads_to_members()
        if stats:  # the preactivation hooks of each member, on its slices (every micro-batch)
            for i, m in enumerate(ms):
                with self.monitor.training(m):
                    stack.replay_hooks(i)
            stack.clear_taps()
        if step is not None:  # one clip and one fused Adam(W) call per group for all members
            norms = step.clip(ms[0].cfg.optim.grad_clip)
            step.step()
        for i, m in enumerate(ms):
            if step is not None:
                m.grad_norm = norms[i]
            else:
                m.grad_norm = clip_grad(list(m.model.parameters()), m.cfg.optim.grad_clip, measure=True)
                m.optimizer.step()
                m.optimizer.zero_grad(set_to_none=True)
            m.step += 1
        return {m.name: losses[i] for i, m in enumerate(ms)}
