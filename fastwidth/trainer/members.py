"""The members of a sweep: one model per (width, depth, lr, seed), built on meta and handed to its engine.

    members = make_members(cfg, stream, device)   # the reference (width, depth) first; one process unless a placement
    loss = member.handle.train_step(x, y, k, ctx, member.loss_fn)   # its engine's step (parallel/engines.py)

member.loss_fn is compiled_loss: (x, y) -> scalar, torch.compile'd under train.compile.

The loop (trainer/loop.py, which re-exports these names) trains them; autocast_for and pick_device
are the precision and device rules it runs them under.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fastwidth.config import Config
from fastwidth.data import data_io
from fastwidth.errors import UserError
from fastwidth.models import build_meta, build_uninitialized
from fastwidth.parallel.engines import MemberHandle
from fastwidth.parallel.env import DistEnv
from fastwidth.parallel.placement import Placement
from fastwidth.param.scaling import ParamInfo, mup_table
from fastwidth.run.members import MemberSpec, member_specs
from fastwidth.trainer import dynamics, sweep


@dataclass
class Member:
    """One model of the sweep and everything that trains it: `handle` is what its engine built
    (model, optimizer, train step, gathered view, save and load); `model` and `optimizer` are the
    handle's (whole_member swaps in the gathered ones for the statistics)."""

    width: int
    seed: int
    cfg: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    table: dict[str, ParamInfo]
    step: int = 0
    base_lr: float | None = None    # set in a learning-rate sweep (sweep.lrs)
    diverged: dict | None = None    # the "diverged" row once the member is stopped
    grad_norm: torch.Tensor | None = None  # before clipping, of the last step
    handle: MemberHandle | None = None
    loss_fn: Callable | None = None  # (x, y) -> the training loss in one process (compiled_loss)
    pass_name: str | None = None    # "refine": trained in the sweep.lr_refine pass (trainer/sweep.py)
    depth: int | None = None        # set in a depth sweep (sweep.depths): its model.depth

    @property
    def name(self) -> str:
        return sweep.member_name(self.width, self.seed, self.base_lr, self.depth)

    @property
    def engine(self):
        """What trains it (fastwidth.parallel.engines.Engine interface; batch_mean for statistics)."""
        return self.handle.engine if self.handle is not None else None


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is visible; use auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(cfg: Config, device: torch.device):
    """bf16 autocast on GPU (precision auto or bf16), fp32 on CPU unless bf16 is asked for."""
    p = cfg.train.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compiled_loss(model: nn.Module, cfg: Config, distributed: bool = False):
    """The member's training loss (x, y) -> scalar; under train.compile its torch.compile (the
    kernels' custom ops trace whole; AOTAutograd compiles the backward with the forward)."""
    kind = cfg.train.loss

    def loss(x, y):
        return dynamics.member_loss(model, x, y, kind)
    if not cfg.train.compile:
        return loss
    if distributed:
        raise UserError(f"train.compile=true is for single-process runs; dist.backend={cfg.dist.backend} wraps "
                        "the model itself (set train.compile=false)")
    return torch.compile(loss)


def tokens_per_step(stream, cfg: Config) -> int:
    """Targets per optimizer step: tokens for text, examples for classification."""
    return cfg.data.batch_size * (cfg.data.seq_len if stream.kind == "tokens" else 1)


def make_members(cfg: Config, stream, device: torch.device, placement: Placement | None = None, memory=None,
                 specs: list | None = None, pass_name: str | None = None) -> list[Member]:
    """Models of every member of run/members.member_specs (width, depth, lr, seed), the reference
    (width, depth) first (sequential mode needs it), or of the (width, base_lr, seed) `specs` of a
    refinement pass (pass_name "refine").
    Each member is built on meta and handed to its engine (placement per width; without one, one
    process: the plain Engine, which materializes it whole on `device`). Every model is built
    first ("built" memory row), then engines and optimizers ("ready")."""
    io = data_io(stream, cfg)
    placement = placement or Placement(cfg, DistEnv(device=device))
    built = []
    for spec in member_specs(cfg) if specs is None else [MemberSpec(w, lr, s) for w, lr, s in specs]:
        wcfg = sweep.for_member(cfg, spec.width, spec.lr, spec.depth)
        meta = build_meta(wcfg, io)
        table = mup_table(meta, wcfg)  # global shapes, before any sharding
        handle = placement.for_width(spec.width).build(spec.name, meta, table, wcfg, spec.seed,
                                                       construct=lambda wcfg=wcfg: build_uninitialized(wcfg, io))
        built.append((spec, handle))
    if memory is not None:
        memory.mark("built", [h.table for _, h in built])
    members = []
    for spec, handle in built:
        h = handle.engine.finish(handle)
        members.append(Member(spec.width, spec.seed, h.wcfg, h.model, h.optimizer, h.table, base_lr=spec.lr,
                              handle=h, pass_name=pass_name, depth=spec.depth,
                              loss_fn=compiled_loss(h.model, cfg, placement.env.active)))
    if memory is not None:
        memory.mark("ready", [m.table for m in members])
    return members
