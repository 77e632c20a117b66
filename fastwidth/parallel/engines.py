"""none | ddp | fsdp2 | deepspeed behind one interface; models stay single-device code.

    engine = build_engine(cfg, env)          # fastwidth/parallel/placement.py (it knows every engine)
    h = engine.build(name, meta_model, table, width_cfg, seed, construct)   # every member first
    engine.finish(h)                                                        # then engines/optimizers
    loss = h.train_step(x, y, micro_steps, StepContext(autocast, pause))    # every optimizer step
    with h.gathered() as whole:                                             # statistics of one member
        top_eig(..., whole.model, whole.optimizer, reduce=engine.batch_mean)
    h.save(where); h.load(where)                                            # a sharded checkpoint's member

One interface for every backend: `Engine` itself is the single-process one (dist.backend none),
and a run always has one, so the loop never asks which engine it drives. Building returns a
`MemberHandle`: the member's model, optimizer and what the engine wrapped around them, with the
member's train step, gathered view and checkpoint calls. `gathered()` is the statistics' view of
one member: a model with whole (unsharded) parameters and a torch optimizer over them holding the
live LRs and Adam's whole v̂. ddp and ZeRO-1/2 hold the model whole and give it as it is;
FSDP2 and ZeRO-3 build a replica of that one member, gathering one tensor at a time, so the
view costs 4P bytes of parameters + 4P of v̂ (P: the member's parameters, fp32) + the largest
tensor in flight, while it is open (the planner's "gathered" term). `batch_mean(tensors)`
averages over the data-parallel ranks what each computed on its share of a batch (equal
shares: the mean is the global batch's value), so batch statistics see the global batch.

Checkpoints (parallel/checkpoints.py): the run's main engine saves and loads every member
(`save` / `load`). One whose members are whole on every rank (`whole_checkpoint`: one process,
ddp) writes the single-process format from rank 0; the sharded engines have each member write its
own directory on every rank (`save_member` / `load_member`: torch.distributed.checkpoint's
safetensors storage for fsdp2 and for the ddp members of a mixed placement, DeepSpeed's own
format for deepspeed).
`check_checkpoint` refuses, in one line, a checkpoint the engine cannot load.

`build` is the one parallelize step, in a fixed order (torchtitan's):
  1. placement: this engine was chosen for the member's width (Placement.for_width);
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

from fastwidth.errors import CheckpointError
from fastwidth.parallel.checkpoints import load_dcp, load_sharded, save_dcp, save_sharded, save_whole
from fastwidth.param.optim import build_optimizer
from fastwidth.param.scaling import ParamInfo, apply_forward_mults, draw_init, init_depth, init_parameters
from fastwidth.run.checkpoint import restore_member


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Blocks that become their own shard unit: the model's own `shard_units()` when it has one
    (a user's model: the blocks of its biggest ModuleList, wherever it sits), else the entries of
    the root's ModuleLists that hold parameters (GPT blocks, MLP layers, ResNet stages); the rest
    stays with the root."""
    own = getattr(model, "shard_units", None)
    if callable(own):
        return list(own())
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


@dataclass
class MemberHandle:
    """What an engine built for one member: `model` (sharded under fsdp2 / ZeRO-3), its
    `optimizer`, `wrapped` (what a train step calls: the DDP module or DeepSpeed engine; None in
    one process and under fsdp2) and the norm of the last step's gradient before clipping. The
    member's calls go to its engine, so a member never needs to know which engine holds it."""

    engine: "Engine"
    name: str
    model: nn.Module
    table: dict[str, ParamInfo]
    wcfg: object                   # the member's config (model.width, optim.lr)
    construct: Callable | None = None   # () -> the model on the current device, uninitialized (replicas)
    optimizer: torch.optim.Optimizer | None = None
    wrapped: object = None
    grad_norm: torch.Tensor | None = None

    def train_step(self, x, y, k: int = 1, ctx: StepContext = StepContext(), loss_fn=None) -> torch.Tensor:
        return self.engine.train_step(self, x, y, k, ctx, loss_fn)

    def gathered(self):
        return self.engine.gathered(self)

    def save(self, where) -> None:
        self.engine.save_member(self, where)

    def load(self, where) -> None:
        self.engine.load_member(self, where)


class Engine:
    """Single-process training (dist.backend none), and the base of the distributed engines."""

    name = "none"
    sharded = False        # parameters split across ranks (fsdp2, ZeRO-3)
    measures_grad_norm = True  # the norm before clipping, for train rows (the others clip inside)
    runs_loss_fn = True        # trains on the loop's loss_fn (the others on their wrapped model.loss)
    whole_checkpoint = True    # every rank holds each member whole: rank 0 writes the single-process format

    def __init__(self, cfg, env):
        self.cfg, self.env = cfg, env

    @contextlib.contextmanager
    def gathered(self, h: MemberHandle):
        """The member with whole parameters (module doc); collective under sharded engines."""
        yield Whole(h.model, h.optimizer)

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

    def replica(self, h: MemberHandle, full_param, state_of) -> Whole:
        """A whole copy of member `h` on this rank: full_param(live parameter) -> its whole
        tensor (one at a time, collective), state_of(name) as optimizer_view's."""
        live = h.model
        with torch.device(self.env.device):
            model = h.construct()                        # torch.empty: every value is copied below
        with torch.no_grad():
            mine = dict(model.named_parameters())
            for n, q in live.named_parameters():
                mine[n].copy_(full_param(q).reshape(mine[n].shape))
            model.reset_buffers()
            theirs = dict(live.named_buffers())
            for n, b in model.named_buffers():
                if n in theirs and theirs[n].shape == b.shape:
                    b.copy_(theirs[n])
        apply_forward_mults(model, h.table)
        model.train(live.training)
        return Whole(model, optimizer_view(model, h.table, h.wcfg, h.optimizer, state_of))

    def _materialize(self, model, table, seed, width, depth=None):
        model.to_empty(device=self.env.device)
        init_parameters(model, table, seed, width, depth)
        model.reset_buffers()
        apply_forward_mults(model, table)
        return model

    def _checkpointing(self, model) -> None:
        if self.cfg.train.activation_checkpointing == "block":
            checkpoint_blocks(model)

    def build(self, name: str, model: nn.Module, table: dict[str, ParamInfo], wcfg, seed: int,
              construct=None) -> MemberHandle:
        """The member's model sharded and initialized; no optimizer or engine state yet."""
        self._checkpointing(model)
        model = self._materialize(model, table, seed, wcfg.model.width, init_depth(wcfg))
        return MemberHandle(self, name, model, table, wcfg, construct)

    def finish(self, h: MemberHandle) -> MemberHandle:
        """The member's optimizer (and what the engine wraps around the model)."""
        h.optimizer = build_optimizer(h.model, h.table, h.wcfg)
        return h

    def loss(self, h: MemberHandle, x, y):
        return h.model.loss(x, y)

    def sync(self, h: MemberHandle, last: bool):
        """Context of one micro-batch's forward and backward: gradient reduction only on the last."""
        return contextlib.nullcontext()

    def train_step(self, h: MemberHandle, x, y, k: int = 1, ctx: StepContext = StepContext(),
                   loss_fn=None) -> torch.Tensor:
        """Forward and backward over k micro-batches, then clip, step and zero; the mean loss.
        loss_fn(x, y): the training loss in one process (train.loss, train.compile); the
        distributed engines run their wrapped model.loss (the config refuses train.loss=mse there)."""
        forward = loss_fn if loss_fn is not None and self.runs_loss_fn else (lambda xi, yi: self.loss(h, xi, yi))
        loss = accumulate(forward, lambda l: (l / k).backward(), x, y, k, ctx, lambda last: self.sync(h, last))
        self.apply_step(h)
        return loss

    def apply_step(self, h: MemberHandle) -> None:
        norm = clip_grad(list(h.model.parameters()), self.cfg.optim.grad_clip, measure=self.measures_grad_norm)
        h.grad_norm = norm if self.measures_grad_norm else None
        h.optimizer.step()
        h.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ checkpoints

    def save(self, ckpt_root, step: int, members: list, extra: dict, keep: int):
        """Checkpoint `step` of `members` (every engine's: this is the run's main engine) under
        ckpt_root, meta.json holding `extra`; returns its path. Collective."""
        if self.whole_checkpoint:
            return save_whole(self.env, ckpt_root, step, members, extra, keep)
        return save_sharded(self.env, ckpt_root, step, members, {"engine": self.checkpoint_info(), **extra}, keep)

    def load(self, members: list, meta: dict, path) -> None:
        """Every member's model, optimizer and step from checkpoint `path` (meta: its
        run.checkpoint.read_checkpoint), refused in one line when this engine cannot load it."""
        self.check_checkpoint(meta.get("engine"), path)
        if self.whole_checkpoint:
            for m in members:
                restore_member(m, meta)
        else:
            load_sharded(members, meta, path)

    def checkpoint_info(self) -> dict:
        """What a sharded checkpoint's meta.json records of the engine that wrote it ("engine")."""
        return {"backend": self.name, "world_size": self.env.world_size, "zero_stage": self.cfg.dist.zero_stage}

    def check_checkpoint(self, info: dict | None, path) -> None:
        """Refuse, with one line, a checkpoint this engine cannot load; info: its meta's "engine"
        (None for the single-process format, which a whole engine reads on any number of ranks;
        a sharded engine reads only its own backend's)."""
        if self.whole_checkpoint and info is not None:
            raise CheckpointError(f"checkpoint {path} was saved by dist.backend={info['backend']}; resume it with "
                                  f"that backend, or export it with `fastwidth export {path}`")
        if not self.whole_checkpoint and (info is None or info["backend"] != self.name):
            got = info["backend"] if info else "none/ddp"
            raise CheckpointError(f"checkpoint {path} was saved by dist.backend={got}, this run uses {self.name}")

    def save_member(self, h: MemberHandle, where) -> None:
        """Member `h` into directory `where` of a sharded checkpoint, every rank writing its part:
        torch.distributed.checkpoint of model and optimizer as safetensors with each piece's
        offsets (so it loads on any number of ranks; a replicated member's copies are
        deduplicated) and the optimizer's other values as JSON (checkpoints.save_dcp). Collective."""
        save_dcp(where, h.model, h.optimizer, self.env.is_main)

    def load_member(self, h: MemberHandle, where) -> None:
        """Member `h` from what save_member wrote in `where`. Collective."""
        load_dcp(where, h.model, h.optimizer)

    def load_members(self, handles: list[MemberHandle], path, info: dict, member_dir: Callable) -> None:
        """Every member of `handles` (members this engine trains) from the sharded checkpoint
        `path` whose meta's "engine" is `info`; member_dir(name) -> the member's directory in it.
        Collective."""
        for h in handles:
            h.load(member_dir(h.name))


class DDPEngine(Engine):
    name = "ddp"
    measures_grad_norm = runs_loss_fn = False

    def finish(self, h):
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        h.wrapped = DDP(LossForward(h.model), device_ids=ids)  # identical on every rank: seeded per name
        h.optimizer = build_optimizer(h.model, h.table, h.wcfg)
        return h

    def loss(self, h, x, y):
        return h.wrapped(x, y)

    def sync(self, h, last):
        return contextlib.nullcontext() if last else h.wrapped.no_sync()


class FSDP2Engine(Engine):
    name = "fsdp2"
    sharded = True
    measures_grad_norm = runs_loss_fn = False
    whole_checkpoint = False

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
        self._checkpointing(model)
        # order: every block its own unit (all-gathered one at a time), then the root (embedding,
        # final norm and readout); loss/features are forward methods so the root unit gathers for them
        for unit in shard_units(model):
            fully_shard(unit, **kw)
        fully_shard(model, **kw)
        register_fsdp_forward_method(model, "loss")
        register_fsdp_forward_method(model, "features")
        model.to_empty(device="cpu" if dc.offload_params else self.env.device)
        init_sharded(model, table, seed, wcfg.model.width, init_depth(wcfg))
        model.reset_buffers()
        apply_forward_mults(model, table)
        return MemberHandle(self, name, model, table, wcfg, construct)

    @contextlib.contextmanager
    def gathered(self, h):
        """A replica of the member: each DTensor's full_tensor() (an all-gather), one at a time;
        Adam's v̂ likewise from the optimizer's DTensor state."""
        opt, named = h.optimizer, dict(h.model.named_parameters())

        def full(t):
            return t.full_tensor() if hasattr(t, "full_tensor") else t

        def state_of(n):
            st = opt.state.get(named[n], {})
            return (float(st["step"]), full(st["exp_avg_sq"]).detach()) if "exp_avg_sq" in st else None
        yield self.replica(h, lambda q: full(q.detach()), state_of)

    def sync(self, h, last):
        h.model.set_requires_gradient_sync(last)  # reduce-scatter only after the last micro-batch
        return contextlib.nullcontext()


@torch.no_grad()
def init_sharded(model: nn.Module, table: dict[str, ParamInfo], seed: int, width: int,
                 depth: int | None = None) -> None:
    """init_parameters for DTensor parameters: each rank draws only the dim-0 rows it holds
    (draw_init with a row range), so a sharded model equals the single-process one and start-up
    work per rank is its shard, not the whole model."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    for name, p in model.named_parameters():
        info = table[name]
        if not isinstance(p, DTensor):
            p.copy_(draw_init(info, seed, width, depth=depth).to(p.dtype))
            continue
        local = p.to_local()
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if any(o != 0 for o in offset[1:]) or tuple(shape[1:]) != tuple(p.shape[1:]):
            raise NotImplementedError(f"{name}: only dim-0 sharding is initialized shard-locally")
        if local.numel():
            rows = draw_init(info, seed, width, (offset[0], offset[0] + shape[0]), depth)
            local.copy_(rows.to(local.dtype))
