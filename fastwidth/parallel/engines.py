"""ddp | fsdp2 | deepspeed behind one interface; models stay single-device code.

    engine = build_engine(cfg, env)          # fastwidth/parallel/placement.py (it knows every engine)
    model = engine.build(name, meta_model, table, width_cfg, seed, construct)   # every member first
    model, optimizer = engine.finish(name, table, width_cfg)                      # then engines/optimizers
    loss = engine.train_step(name, x, y, micro_steps, StepContext(autocast, pause))  # every optimizer step

`build` is the one parallelize step, in a fixed order (torchtitan's):
  1. placement: this engine was chosen for the member's width (placement.engine_for_width);
  2. activation checkpointing of every block (train.activation_checkpointing=block);
  3. shard and materialize: FSDP2 `fully_shard` on the meta model then `to_empty` (local shards
     only); ZeRO-3 constructs under `deepspeed.zero.Init` (each layer partitioned as it is made);
     ddp and ZeRO-1/2 materialize the whole model;
  4. init: each rank draws only what it holds (draw_init rows for DTensor shards, draw_init_flat
     for a ZeRO-3 partition), so a sharded model equals the single-process one.
`finish` creates what holds optimizer state (DDP buckets, the DeepSpeed engine, the optimizer):
the loop measures memory between the two ("built" and "ready" rows). The optimizer's param
groups are built from the µP table and carry lr_mult / wd_mult; fastwidth's schedule writes every
group's LR each step, so no engine scheduler is ever created.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fastwidth.param.optim import build_optimizer
from fastwidth.param.scaling import ParamInfo, apply_forward_mults, draw_init, init_parameters


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Blocks that become their own shard unit: entries of the root's ModuleLists that hold
    parameters (GPT blocks, MLP layers, ResNet stages); the rest stays with the root."""
    units = []
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            units += [m for m in child if any(True for _ in m.parameters())]
    return units


def checkpoint_blocks(model: nn.Module) -> int:
    """Recompute each shard unit's forward in backward instead of saving its activations
    (torch.utils.checkpoint, non-reentrant). The instance's forward is replaced, so parameter
    names (the µP table's keys) do not change; FSDP2's and DeepSpeed's hooks stay on the module
    call around it. Returns the number of blocks wrapped."""
    from torch.utils.checkpoint import checkpoint
    units = shard_units(model)
    for unit in units:
        plain = unit.forward

        @functools.wraps(plain)
        def forward(*args, _plain=plain, **kwargs):
            if not torch.is_grad_enabled():
                return _plain(*args, **kwargs)
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
        unit.forward = forward
    return len(units)


class LossForward(nn.Module):
    """forward(x, y) = model.loss(x, y); forward(x) = model(x): the engines only hook forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, y=None):
        return self.model(x) if y is None else self.model.loss(x, y)


def clip_grad(params, max_norm: float, measure: bool = False):
    """Clip the global gradient norm to max_norm when it is > 0. Returns the norm before clipping
    (a tensor, no host sync), or None when neither clipping nor `measure`."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if measure:
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return None


def micro_batches(x: torch.Tensor, y: torch.Tensor, k: int):
    """k equal row slices of this rank's batch (k divides it: checked in parallel.placement)."""
    return list(zip(x.chunk(k), y.chunk(k))) if k > 1 else [(x, y)]


@dataclass(frozen=True)
class StepContext:
    """Context factories of one training step: `forward` around each micro-batch's forward
    (autocast), `backward` around each backward (statistics hooks paused, so activation
    checkpointing's recomputed forwards are not counted twice)."""

    forward: Callable = contextlib.nullcontext
    backward: Callable = contextlib.nullcontext


def accumulate(forward, backward, x, y, k: int, ctx: StepContext = StepContext(), sync=None) -> torch.Tensor:
    """One optimizer step's gradients over k micro-batches: forward(xi, yi) -> loss (the mean over
    its rows), backward(loss); sync(last) wraps each micro-batch (gradient reduction only on the
    last). Every micro-batch holds the same number of targets, so the mean of the k losses is the
    whole batch's mean and gradients of loss / k sum to its gradient. Returns the mean loss."""
    parts = micro_batches(x, y, k)
    total = None
    for i, (xi, yi) in enumerate(parts):
        with sync(i == len(parts) - 1) if sync else contextlib.nullcontext():
            with ctx.forward():
                loss = forward(xi, yi)
            with ctx.backward():
                backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
    return total / len(parts)


def local_step(model, optimizer, x, y, k: int, ctx: StepContext, grad_clip: float, loss_fn=None,
               on_grad_norm=None) -> torch.Tensor:
    """A single-process optimizer step with k-way gradient accumulation; loss_fn(x, y) defaults to
    the model's fused readout + cross-entropy; on_grad_norm(norm) receives the gradient norm
    before clipping (train rows log it)."""
    loss = accumulate(loss_fn or model.loss, lambda l: (l / k).backward(), x, y, k, ctx)
    norm = clip_grad(list(model.parameters()), grad_clip, measure=on_grad_norm is not None)
    if on_grad_norm is not None:
        on_grad_norm(norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


class Engine:
    """Base: plain single-process training (used for backend none only by tests)."""

    name = "none"
    sharded = False        # parameters split across ranks (fsdp2, ZeRO-3)

    def __init__(self, cfg, env):
        self.cfg, self.env = cfg, env
        self.handles: dict[str, object] = {}
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def _materialize(self, model, table, seed, width):
        model.to_empty(device=self.env.device)
        init_parameters(model, table, seed, width)
        model.reset_buffers()
        apply_forward_mults(model, table)
        return model

    def _checkpointing(self, model) -> None:
        if self.cfg.train.activation_checkpointing == "block":
            checkpoint_blocks(model)

    def build(self, name: str, model: nn.Module, table: dict[str, ParamInfo], wcfg, seed: int, construct=None):
        """The member's model sharded and initialized; no optimizer or engine state yet."""
        self._checkpointing(model)
        self.models[name] = self._materialize(model, table, seed, wcfg.model.width)
        return self.models[name]

    def finish(self, name: str, table: dict[str, ParamInfo], wcfg):
        model = self.models[name]
        self.handles[name], self.optimizers[name] = model, build_optimizer(model, table, wcfg)
        return model, self.optimizers[name]

    def wrap(self, name, model, table, wcfg, seed, construct=None):
        self.build(name, model, table, wcfg, seed, construct)
        return self.finish(name, table, wcfg)

    def loss(self, name: str, x, y):
        return self.models[name].loss(x, y)

    def sync(self, name: str, last: bool):
        """Context of one micro-batch's forward and backward: gradient reduction only on the last."""
        return contextlib.nullcontext()

    def train_step(self, name: str, x, y, k: int = 1, ctx: StepContext = StepContext()) -> torch.Tensor:
        """Forward and backward over k micro-batches, then clip, step and zero; the mean loss."""
        loss = accumulate(lambda xi, yi: self.loss(name, xi, yi), lambda l: (l / k).backward(), x, y, k,
                          ctx, lambda last: self.sync(name, last))
        self.apply_step(name)
        return loss

    def apply_step(self, name: str) -> None:
        clip_grad(self.models[name].parameters(), self.cfg.optim.grad_clip)
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)


class DDPEngine(Engine):
    name = "ddp"

    def finish(self, name, table, wcfg):
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = self.models[name]  # identical on every rank: seeded per name
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.handles[name] = DDP(LossForward(model), device_ids=ids)
        self.optimizers[name] = build_optimizer(model, table, wcfg)
        return model, self.optimizers[name]

    def loss(self, name, x, y):
        return self.handles[name](x, y)

    def sync(self, name, last):
        return contextlib.nullcontext() if last else self.handles[name].no_sync()


class FSDP2Engine(Engine):
    name = "fsdp2"
    sharded = True

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        self.mesh = self.make_mesh()  # with the process group (before the memory baseline): ~70 MB of gloo state

    def make_mesh(self):
        """1-D over every rank, or (replicate, shard) for HSDP (dist.replicate groups)."""
        from torch.distributed.device_mesh import init_device_mesh
        r, world = self.cfg.dist.replicate, self.env.world_size
        kind = self.env.device.type
        if r > 1:
            return init_device_mesh(kind, (r, world // r), mesh_dim_names=("replicate", "shard"))
        return init_device_mesh(kind, (world,), mesh_dim_names=("shard",))

    def build(self, name, model, table, wcfg, seed, construct=None):
        from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                            register_fsdp_forward_method)
        dc, cuda = self.cfg.dist, self.env.device.type == "cuda"
        kw = {"mesh": self.mesh,
              "offload_policy": CPUOffloadPolicy(pin_memory=cuda) if dc.offload_params else OffloadPolicy()}
        if dc.mixed_precision == "bf16":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        self._checkpointing(model)
        # order: every block its own unit (all-gathered one at a time), then the root (embedding,
        # final norm and readout); loss/features are forward methods so the root unit gathers for them
        for unit in shard_units(model):
            fully_shard(unit, **kw)
        fully_shard(model, **kw)
        register_fsdp_forward_method(model, "loss")
        register_fsdp_forward_method(model, "features")
        model.to_empty(device="cpu" if dc.offload_params else self.env.device)
        init_sharded(model, table, seed, wcfg.model.width)
        model.reset_buffers()
        apply_forward_mults(model, table)
        self.models[name] = model
        return model

    def sync(self, name, last):
        model = self.models[name]

        model.set_requires_gradient_sync(last)  # reduce-scatter only after the last micro-batch
        return contextlib.nullcontext()


@torch.no_grad()
def init_sharded(model: nn.Module, table: dict[str, ParamInfo], seed: int, width: int) -> None:
    """init_parameters for DTensor parameters: each rank draws only the dim-0 rows it holds
    (draw_init with a row range), so a sharded model equals the single-process one and start-up
    work per rank is its shard, not the whole model."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    for name, p in model.named_parameters():
        info = table[name]
        if not isinstance(p, DTensor):
            p.copy_(draw_init(info, seed, width).to(p.dtype))
            continue
        local = p.to_local()
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if any(o != 0 for o in offset[1:]) or tuple(shape[1:]) != tuple(p.shape[1:]):
            raise NotImplementedError(f"{name}: only dim-0 sharding is initialized shard-locally")
        if local.numel():
            rows = draw_init(info, seed, width, (offset[0], offset[0] + shape[0]))
            local.copy_(rows.to(local.dtype))
