"""ddp | fsdp2 | deepspeed behind one interface; models stay single-device code.

    engine = build_engine(cfg, env)
    model, optimizer = engine.wrap(name, meta_model, table, width_cfg, seed)   # one per sweep member
    loss = engine.loss(name, x, y); engine.step(name, loss)                     # every optimizer step

`wrap` is the one parallelize step, in a fixed order: build on meta (done by the caller, with the
µP table computed from the meta model's global shapes), shard, materialize, init. Every member of
a sweep gets its own engine instance over the same process group. The returned `model` is the
module the statistics hooks and the probe forward use (FSDP2 and DeepSpeed shard it in place, so
`model(x)` gathers what it needs); the optimizer's param groups are built from the µP table and
carry lr_mult / wd_mult, and fastwidth's schedule writes every group's LR each step, so no engine
scheduler is ever created.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from fastwidth.errors import ConfigError
from fastwidth.param.optim import build_optimizer
from fastwidth.param.scaling import ParamInfo, apply_forward_mults, draw_init, init_parameters


def import_deepspeed(cuda: bool):
    """Import deepspeed for this machine. On the CPU: accelerator 'cpu', and no shared-memory comm op
    (it only speeds CPU inference all-reduce, and its JIT C++ build took > 3 min on 2 cores)."""
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError:
        raise ConfigError("dist.backend=deepspeed but deepspeed is not installed (pip install '.[dist]')") from None
    if not cuda:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Blocks that become their own shard unit: entries of the root's ModuleLists that hold
    parameters (GPT blocks, MLP layers, ResNet stages); the rest stays with the root."""
    units = []
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            units += [m for m in child if any(True for _ in m.parameters())]
    return units


class LossForward(nn.Module):
    """forward(x, y) = model.loss(x, y); forward(x) = model(x): the engines only hook forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, y=None):
        return self.model(x) if y is None else self.model.loss(x, y)


def clip_grad(params, max_norm: float) -> None:
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


class Engine:
    """Base: plain single-process training (used for backend none only by tests)."""

    name = "none"
    sharded = False        # parameters split across ranks (fsdp2, ZeRO-3): no whole-model statistics

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

    def wrap(self, name: str, model: nn.Module, table: dict[str, ParamInfo], wcfg, seed: int):
        model = self._materialize(model, table, seed, wcfg.model.width)
        opt = build_optimizer(model, table, wcfg)
        self.handles[name], self.models[name], self.optimizers[name] = model, model, opt
        return model, opt

    def loss(self, name: str, x, y):
        return self.models[name].loss(x, y)

    def step(self, name: str, loss) -> None:
        loss.backward()
        clip_grad(self.models[name].parameters(), self.cfg.optim.grad_clip)
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)


class DDPEngine(Engine):
    name = "ddp"

    def wrap(self, name, model, table, wcfg, seed):
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = self._materialize(model, table, seed, wcfg.model.width)  # identical on every rank: seeded per name
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.handles[name] = DDP(LossForward(model), device_ids=ids)
        opt = build_optimizer(model, table, wcfg)
        self.models[name], self.optimizers[name] = model, opt
        return model, opt

    def loss(self, name, x, y):
        return self.handles[name](x, y)


class FSDP2Engine(Engine):
    name = "fsdp2"
    sharded = True

    def wrap(self, name, model, table, wcfg, seed):
        from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                            register_fsdp_forward_method)
        dc, cuda = self.cfg.dist, self.env.device.type == "cuda"
        kw = {"offload_policy": CPUOffloadPolicy(pin_memory=cuda) if dc.offload_params else OffloadPolicy()}
        if dc.mixed_precision == "bf16":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
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
        opt = build_optimizer(model, table, wcfg)
        self.handles[name], self.models[name], self.optimizers[name] = model, model, opt
        return model, opt


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


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed JSON, generated from the YAML (never a second file): batch, clipping, ZeRO
    stage and offload from fastwidth's keys, then `dist.deepspeed` merged over it."""
    dc, b = cfg.dist, cfg.data.batch_size
    zero = {"stage": dc.zero_stage}
    if dc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if dc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    out = {"train_batch_size": b, "train_micro_batch_size_per_gpu": b // world_size,
           "gradient_accumulation_steps": 1, "gradient_clipping": cfg.optim.grad_clip,
           "zero_optimization": zero, "bf16": {"enabled": dc.mixed_precision == "bf16"},
           # fastwidth's own torch optimizer (param groups from the µP table) under every stage;
           # DeepSpeedCPUAdam would need a C++ build and would not know lr_mult
           "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
           "steps_per_print": 1 << 62, "wall_clock_breakdown": False}
    return _merge(out, dc.deepspeed)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        self.ds = import_deepspeed(env.device.type == "cuda")
        self.sharded = cfg.dist.zero_stage == 3
        self.ds_config = deepspeed_config(cfg, env.world_size)

    def wrap(self, name, model, table, wcfg, seed):
        # materialized whole, then partitioned by initialize (ZeRO-3 host peak: one full copy per rank)
        model = self._materialize(model, table, seed, wcfg.model.width)
        wrapper = LossForward(model)
        if self.sharded:  # model.loss reads the readout weight outside the readout's forward
            for p in model.readout.parameters():
                self.ds.zero.register_external_parameter(wrapper, p)
        opt = build_optimizer(model, table, wcfg)
        engine, ds_opt, _, _ = self.ds.initialize(model=wrapper, optimizer=opt, config=copy.deepcopy(self.ds_config))
        self.handles[name], self.models[name], self.optimizers[name] = engine, model, ds_opt
        return model, ds_opt

    def loss(self, name, x, y):
        return self.handles[name](x, y)

    def step(self, name, loss):
        engine = self.handles[name]
        engine.backward(loss)
        engine.step()  # clips (gradient_clipping), steps and zeroes the gradients


ENGINES = {"ddp": DDPEngine, "fsdp2": FSDP2Engine, "deepspeed": DeepSpeedEngine}


def build_engine(cfg, env) -> Engine | None:
    """The engine of cfg.dist.backend, or None for single-process training."""
    if cfg.dist.backend == "none":
        return None
    return ENGINES[cfg.dist.backend](cfg, env)
