"""fastwidth.Consistency inside a Hugging Face Trainer or a Lightning Trainer: one callback per
trainer, every callback of a sweep sharing one Consistency, one report at the end.

    c = fastwidth.Consistency({"w64": (m64, 64, 0), "w256": (m256, 256, 0)}, probe=(x, y), run_dir="runs/mine")
    for name, (model, _, _) in ...:
        transformers.Trainer(model, args, train_dataset=ds, callbacks=[hf_callback(c, name)]).train()
        # or lightning.Trainer(callbacks=[lightning_callback(c, name)]).fit(module, loader)
    # the last trainer to finish writes RUN/report/

Each trainer trains one member. A member's step is its trainer's optimizer step count
(state.global_step, trainer.global_step), and members are compared at equal counts: give every
trainer the same dataset, batch size (× accumulation × devices) and data-order seed (HF
args.seed / args.data_seed; Lightning the loader's generator), so step s has seen the same
examples in every member. Trainers may run one after another or interleaved in one process; the
comparisons of a step are written once the reference width's signature at it exists.

The rows' tokens are step × Consistency.tokens_per_step; left None, a callback sets it to the
examples of one optimizer step (HF: train_batch_size × accumulation × world size; Lightning: the
first batch's labels, else its examples, × accumulation × world size): pass tokens_per_step =
batch × sequence length for a language model's tokens.

The step's own forwards are observed for the preactivations (between step begin and step end),
so the statistics add no forward of their own on training batches. With gradient checkpointing,
recomputed forwards are observed too (their preactivations counted twice).

transformers and lightning are imported only here, and only when a callback is made; without the
package one line says what to install.
"""
from __future__ import annotations

import functools
import importlib

from fastwidth.errors import UserError


def _need(module: str, what: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the {package} package: pip install {package}") from None


def _loss(value):
    """A logged or returned loss as a float (None when there is none)."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("loss")
    try:
        return float(value.detach()) if hasattr(value, "detach") else float(value)
    except (TypeError, ValueError):
        return None


@functools.cache
def _hf_class():
    transformers = _need("transformers", "the Hugging Face callback", "transformers")

    class ConsistencyCallback(transformers.TrainerCallback):
        """on_train_begin: the step-0 evaluation; on_step_begin/on_step_end: the step's forwards
        observed, then Consistency.after_step at state.global_step (the evaluation when the
        schedule has it); on_log: train rows from the logged loss; on_train_end: this member is
        done (the report once every member is)."""

        def __init__(self, consistency, member: str):
            self.c, self.member = consistency, member
            consistency.member(member)  # an unknown name fails here, not mid-training

        def on_train_begin(self, args, state, control, **kwargs):
            if self.c.steps is None:
                self.c.steps = state.max_steps
            if self.c.tokens_per_step is None:
                self.c.tokens_per_step = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
            if state.global_step == 0:
                self.c.evaluate(0, [self.member])

        def on_step_begin(self, args, state, control, **kwargs):
            self.c.arm(self.member)

        def on_step_end(self, args, state, control, **kwargs):
            self.c.disarm(self.member)
            self.c.after_step(state.global_step, members=[self.member])

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = _loss(logs)
            if loss is not None:
                self.c.log_train(self.member, state.global_step, loss)

        def on_train_end(self, args, state, control, **kwargs):
            self.c.disarm(self.member)
            self.c.finish(self.member)

    return ConsistencyCallback


def hf_callback(consistency, member: str):
    """A transformers TrainerCallback feeding `consistency` the training of member `member`."""
    return _hf_class()(consistency, member)


@functools.cache
def _lightning_class():
    try:
        pl = importlib.import_module("lightning.pytorch")
    except ImportError:
        pl = _need("pytorch_lightning", "the Lightning callback", "lightning")

    class ConsistencyCallback(pl.Callback):
        """on_train_start: the step-0 evaluation; on_train_batch_start/_end: the batch's forward
        observed, then Consistency.after_step at trainer.global_step (once per optimizer step
        under gradient accumulation) with the loss the training_step returned; on_train_end:
        this member is done (the report once every member is)."""

        def __init__(self, consistency, member: str):
            self.c, self.member = consistency, member
            self._last = -1
            consistency.member(member)

        def on_train_start(self, pl_trainer, pl_module):
            if self.c.steps is None:
                self.c.steps = int(pl_trainer.max_steps if pl_trainer.max_steps and pl_trainer.max_steps > 0
                                   else pl_trainer.estimated_stepping_batches)
            self._last = pl_trainer.global_step
            if pl_trainer.global_step == 0:
                self.c.evaluate(0, [self.member])

        def on_train_batch_start(self, pl_trainer, pl_module, batch, batch_idx):
            self.c.arm(self.member)

        def on_train_batch_end(self, pl_trainer, pl_module, outputs, batch, batch_idx):
            self.c.disarm(self.member)
            step = pl_trainer.global_step
            if step == self._last:  # an accumulation micro-batch: no optimizer step yet
                return
            self._last = step
            if self.c.tokens_per_step is None:
                from fastwidth.interop.consistency import _targets
                self.c.tokens_per_step = _targets(batch) * pl_trainer.accumulate_grad_batches * pl_trainer.world_size
            self.c.after_step(step, loss={self.member: _loss(outputs)}, members=[self.member])

        def on_train_end(self, pl_trainer, pl_module):
            self.c.disarm(self.member)
            self.c.finish(self.member)

    return ConsistencyCallback


def lightning_callback(consistency, member: str):
    """A Lightning Callback feeding `consistency` the training of member `member`."""
    return _lightning_class()(consistency, member)
