"""ddp | fsdp2 | deepspeed behind one interface; models stay single-device code.

    engine = build_engine(cfg, env)          # fastwidth/parallel/placement.py (it knows every engine)
    model = engine.build(name, meta_model, table, width_cfg, seed, construct)   # every member first
    model, optimizer = engine.finish(name, table, width_cfg)                      # then engines/optimizers
    loss = engine.train_step(name, x, y, micro_steps, StepContext(autocast, pause))  # every optimizer step
    with engine.gathered(name) as whole:                                          # statistics of one member
        top_eig(..., whole.model, whole.optimizer, reduce=engine.batch_mean)

One interface for every backend: `Engine` itself is the single-process one (dist.backend none),
so the loop never asks which engine it drives. `gathered(name)` is the statistics' view of one
member: a model with whole (unsharded) parameters and a torch optimizer over them holding the
live LRs and Adam's whole v̂. ddp and ZeRO-1/2 hold the model whole and give it as it is;
FSDP2 and ZeRO-3 build a replica of that one member, gathering one tensor at a time, so the
view costs 4P bytes of parameters + 4P of v̂ (P: the member's parameters, fp32) + the largest
tensor in flight, while it is open (the planner's "gathered" term). `batch_mean(tensors)`
averages over the data-parallel ranks what each computed on its share of a batch (equal
shares: the mean is the global batch's value), so batch statistics see the global batch.

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


@dataclass(frozen=True)
class Whole:
    """One member as a single process holds it: `model` with plain whole parameters, `optimizer`
    a torch optimizer over exactly those parameters (groups with lr, lr_mult, betas; per-parameter
    state with Adam's step and exp_avg_sq when it has any). Read-only: statistics never step it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer


def optimizer_view(model: nn.Module, table: dict[str, ParamInfo], wcfg, live, state_of) -> torch.optim.Optimizer:
    """A torch optimizer of the member's class over `model` (groups from the µP table, the live
    optimizer's LRs by (lr_mult, wd_mult)); state_of(name) -> (step, whole exp_avg_sq) or None.
    Called on every rank (state_of may be a collective)."""
    view = build_optimizer(model, table, wcfg)
    lrs = {(g["lr_mult"], g["wd_mult"]): g["lr"] for g in live.param_groups if "lr_mult" in g}
    for g in view.param_groups:
        g["lr"] = lrs.get((g["lr_mult"], g["wd_mult"]), g["lr"])
    if not isinstance(view, (torch.optim.Adam, torch.optim.AdamW)):
        return view                                      # SGD: P = lr, no state needed
    for name, p in model.named_parameters():
        got = state_of(name)
        if got is not None:
            step, sq = got
            view.state[p] = {"step": torch.tensor(float(step)), "exp_avg_sq": sq.reshape(p.shape).to(p)}
    return view


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


class Engine:
    """Single-process training (dist.backend none), and the base of the distributed engines."""

    name = "none"
    sharded = False        # parameters split across ranks (fsdp2, ZeRO-3)
    measures_grad_norm = True  # the norm before clipping, for train rows (the others clip inside)
    runs_loss_fn = True        # trains on the loop's loss_fn (the others on their wrapped model.loss)

    def __init__(self, cfg, env):
        self.cfg, self.env = cfg, env
        self.handles: dict[str, object] = {}
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.specs: dict[str, tuple] = {}           # name -> (table, wcfg, construct): replicas
        self.grad_norms: dict[str, torch.Tensor | None] = {}

    @contextlib.contextmanager
    def gathered(self, name: str):
        """The member with whole parameters (module doc); collective under sharded engines."""
        yield Whole(self.models[name], self.optimizers[name])

    def batch_mean(self, tensors: list) -> list:
        """Each tensor averaged in place over the ranks (each computed on its equal share of the
        global batch); unchanged in one process. Collective."""
        import torch.distributed as dist
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            for t in tensors:
                dist.all_reduce(t)
                t.div_(world)
        return tensors

    def replica(self, name: str, full_param, state_of) -> Whole:
        """A whole copy of member `name` on this rank: full_param(live parameter) -> its whole
        tensor (one at a time, collective), state_of(name) as optimizer_view's."""
        table, wcfg, construct = self.specs[name]
        live = self.models[name]
        with torch.device(self.env.device):
            model = construct()                          # torch.empty: every value is copied below
        with torch.no_grad():
            mine = dict(model.named_parameters())
            for n, q in live.named_parameters():
                mine[n].copy_(full_param(q).reshape(mine[n].shape))
            model.reset_buffers()
            theirs = dict(live.named_buffers())
            for n, b in model.named_buffers():
                if n in theirs and theirs[n].shape == b.shape:
                    b.copy_(theirs[n])
        apply_forward_mults(model, table)
        model.train(live.training)
        return Whole(model, optimizer_view(model, table, wcfg, self.optimizers[name], state_of))

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
        self.specs[name] = (table, wcfg, construct)
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

    def train_step(self, name: str, x, y, k: int = 1, ctx: StepContext = StepContext(), loss_fn=None) -> torch.Tensor:
        """Forward and backward over k micro-batches, then clip, step and zero; the mean loss.
        loss_fn(x, y): the training loss in one process (train.loss, train.compile); the
        distributed engines run their wrapped model.loss (the config refuses train.loss=mse there)."""
        forward = loss_fn if loss_fn is not None and self.runs_loss_fn else (lambda xi, yi: self.loss(name, xi, yi))
        loss = accumulate(forward, lambda l: (l / k).backward(), x, y, k, ctx, lambda last: self.sync(name, last))
        self.apply_step(name)
        return loss

    def apply_step(self, name: str) -> None:
        norm = clip_grad(list(self.models[name].parameters()), self.cfg.optim.grad_clip,
                         measure=self.measures_grad_norm)
        self.grad_norms[name] = norm if self.measures_grad_norm else None
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)


class DDPEngine(Engine):
    name = "ddp"
    measures_grad_norm = runs_loss_fn = False

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
    measures_grad_norm = runs_loss_fn = False

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        self.mesh = self.make_mesh()  # with the process group (before the memory baseline): ~70 MB of gloo state

    def make_mesh(self):
        """1-D over every rank, or (replicate, shard) for HSDP: dist.replicate groups, or one per
        node (-1), each shard group within a node when it fits in one (nodes.hsdp_layout)."""
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
        from fastwidth.parallel import nodes
        world, kind = self.env.world_size, self.env.device.type
        rows = nodes.hsdp_layout(nodes.node_keys(self.env), self.cfg.dist.replicate) if self.cfg.dist.replicate else [[0]]
        if len(rows) < 2:
            return init_device_mesh(kind, (world,), mesh_dim_names=("shard",))
        if rows == torch.arange(world).view(len(rows), -1).tolist():  # the launchers' numbering
            return init_device_mesh(kind, (len(rows), world // len(rows)), mesh_dim_names=("replicate", "shard"))
        return DeviceMesh(kind, torch.tensor(rows), mesh_dim_names=("replicate", "shard"))

    def build(self, name, model, table, wcfg, seed, construct=None):
        from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                            register_fsdp_forward_method)
        dc, cuda = self.cfg.dist, self.env.device.type == "cuda"
        kw = {"mesh": self.mesh,
              "offload_policy": CPUOffloadPolicy(pin_memory=cuda) if dc.offload_params else OffloadPolicy()}
        if dc.mixed_precision == "bf16":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        self.specs[name] = (table, wcfg, construct)
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

    @contextlib.contextmanager
    def gathered(self, name):
        """A replica of the member: each DTensor's full_tensor() (an all-gather), one at a time;
        Adam's v̂ likewise from the optimizer's DTensor state."""
        opt, named = self.optimizers[name], dict(self.models[name].named_parameters())

        def full(t):
            return t.full_tensor() if hasattr(t, "full_tensor") else t

        def state_of(n):
            st = opt.state.get(named[n], {})
            return (float(st["step"]), full(st["exp_avg_sq"]).detach()) if "exp_avg_sq" in st else None
        yield self.replica(name, lambda q: full(q.detach()), state_of)

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
