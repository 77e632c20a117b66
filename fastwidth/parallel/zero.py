"""DeepSpeed ZeRO 1-3 behind fastwidth's Engine interface (see engines.py for the order).

ZeRO-3 builds under `deepspeed.zero.Init`: every layer is partitioned as soon as its __init__
returns (each rank keeps `p.ds_tensor`, its flat slice), so no rank ever holds more than one
layer whole. Then each rank initializes only its partition with draw_init_flat. DeepSpeed's
layout (runtime/zero/partition_parameters.py, 0.19.8): a parameter of n elements is padded to a
multiple of the world size W, partition size s = ceil(n / W), rank r holds flat elements
[r·s, (r+1)·s) of the padded tensor; elements past n are padding (zeroed here).
Known cost: zero.Init broadcasts each freshly allocated layer from rank 0 before partitioning it
(one layer in flight at a time, no drawing: torch.empty values are overwritten by the init).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import time

import torch

from fastwidth.errors import CheckpointError, ConfigError
from fastwidth.param.optim import build_optimizer, param_groups, set_lr
from fastwidth.param.scaling import ParamInfo, apply_forward_mults, draw_init_flat, init_depth
from fastwidth.parallel import zero_files
from fastwidth.parallel.engines import (Engine, LossForward, MemberHandle, StepContext, Whole, accumulate,
                                        optimizer_view, shard_units)

log = logging.getLogger("fastwidth.parallel")

# DeepSpeed's defaults are 5e8 elements for reduce/allgather buckets: 2 GB fp32 each, far above
# what a small model needs and reserved on the GPU whatever the model. Scaled to the model: twice
# the largest block's parameters, at least 2**20 and at most DeepSpeed's default.
BUCKET_MIN, BUCKET_MAX = 1 << 20, 500_000_000


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


def bucket_elements(block_params: int) -> int:
    return int(min(BUCKET_MAX, max(BUCKET_MIN, 2 * block_params)))


def deepspeed_config(cfg, world_size: int, block_params: int = 0, micro_steps: int = 1) -> dict:
    """The DeepSpeed JSON, generated from the YAML (never a second file): batch, accumulation,
    clipping, ZeRO stage, offload and buckets from fastwidth's keys, then `dist.deepspeed` over it."""
    dc, b = cfg.dist, cfg.data.batch_size
    bucket = bucket_elements(block_params or BUCKET_MAX)
    zero = {"stage": dc.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
            "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if dc.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=bucket, stage3_param_persistence_threshold=min(bucket // 8, 100_000),
                    stage3_max_live_parameters=4 * bucket)
    if dc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if dc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    out = {"train_batch_size": b, "train_micro_batch_size_per_gpu": b // world_size // micro_steps,
           "gradient_accumulation_steps": micro_steps, "gradient_clipping": cfg.optim.grad_clip,
           "zero_optimization": zero, "bf16": {"enabled": dc.mixed_precision == "bf16"},
           # reduce gradients in fp32 as FSDP2 does (DeepSpeed's default is the bf16 compute dtype)
           "communication_data_type": "fp32",
           **({"data_types": {"grad_accum_dtype": "fp32"}} if dc.mixed_precision == "bf16" else {}),
           # fastwidth's optimizer (param groups from the µP table) under every stage
           "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
           "steps_per_print": 1 << 62, "wall_clock_breakdown": False}
    return _merge(out, dc.deepspeed)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@torch.no_grad()
def init_zero_partitions(model, table: dict[str, ParamInfo], seed: int, width: int, rank: int,
                         depth: int | None = None) -> None:
    """Each rank draws only its ZeRO-3 partition of every parameter (draw_init_flat)."""
    for name, p in model.named_parameters():
        part = p.ds_tensor
        size = part.numel()
        start, stop = rank * size, min((rank + 1) * size, p.ds_numel)
        part.zero_()
        if stop > start:
            part[:stop - start].copy_(draw_init_flat(table[name], seed, width, start, stop, depth).to(part.dtype))


def cpu_adam(model, table, wcfg):
    """DeepSpeedCPUAdam over the µP groups (it reads each group's lr, weight_decay and eps every
    step: deepspeed/ops/adam/cpu_adam.py, 0.19.8, so eps_mult and independent decay hold), or None
    with one warning line when its C++ op cannot be built here."""
    oc = wcfg.optim
    if oc.name not in ("adam", "adamw"):
        return None
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        t0 = time.time()
        # the first use JIT-builds DeepSpeed's cpu_adam C++ op (cached in TORCH_EXTENSIONS_DIR):
        # 682 s measured on a loaded 2-core CPU machine, much less on a many-core GPU host
        log.info("loading DeepSpeedCPUAdam (its C++ op is built on first use: minutes on a small machine)")
        opt = DeepSpeedCPUAdam(param_groups(model, table), lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps,
                               weight_decay=oc.weight_decay, adamw_mode=oc.name == "adamw")
    except Exception as e:  # noqa: BLE001 - a failed JIT build raises many types
        log.warning("DeepSpeedCPUAdam unavailable (%s); optimizer offload runs torch %s on the CPU",
                    str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__, oc.name)
        return None
    log.info("DeepSpeedCPUAdam ready in %.1f s", time.time() - t0)
    set_lr(opt, oc, step=0, total_steps=wcfg.train.steps)
    return opt


def adam_step(ds_optimizer) -> float | None:
    """The step count of DeepSpeed's inner optimizer (its state holds flat partitions), or None
    before its first step."""
    inner = getattr(ds_optimizer, "optimizer", ds_optimizer)
    steps = [float(st["step"]) for st in inner.state.values() if isinstance(st, dict) and "step" in st]
    return max(steps) if steps else None


def zero12_states(ds_optimizer, key: str = "exp_avg_sq") -> dict[int, torch.Tensor]:
    """{id(parameter): its whole `key` state} under ZeRO-1/2. DeepSpeed keeps the state of flat fp32
    partitions; each rank copies its fragment of each parameter (the parameter's `_hp_mapping`
    addresses, as deepspeed.utils.tensor_fragment.get_full_hp_param does) into a zero buffer and
    an all-reduce over the data-parallel group assembles the tensor. (safe_get_full_optimizer_state
    finds no state here: the fragments are linked before torch's Adam makes it at step 1.)
    Collective; empty before the first step."""
    import torch.distributed as dist
    inner = getattr(ds_optimizer, "optimizer", ds_optimizer)
    out = {}
    for lp_group, flat in zip(ds_optimizer.bit16_groups, ds_optimizer.single_partition_of_fp32_groups):
        if key not in inner.state.get(flat, {}):
            continue
        st = inner.state[flat][key]
        for p in lp_group:
            full = torch.zeros(p.numel(), dtype=torch.float32, device=st.device)
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                lp, hp = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
                full.narrow(0, lp.start, lp.numel).copy_(st.narrow(0, hp.start, hp.numel))
            dist.all_reduce(full, group=getattr(p, "_dp_group", None))
            out[id(p)] = full.reshape(p.shape)
    return out


def check_zero_shards(info: dict, world_size: int, zero_stage: int, where) -> None:
    """Refuse, with one line, DeepSpeed shards (info: a checkpoint meta's "engine") that this run
    cannot load: another ZeRO stage, or ZeRO-1/2 shards of another rank count (ZeRO-3 shards of
    another rank count reshard through the universal checkpoint: DeepSpeedEngine.load_universal)."""
    other_world = info["world_size"] != world_size and info["zero_stage"] != 3
    if other_world or info["zero_stage"] != zero_stage:
        raise CheckpointError(f"checkpoint {where} holds ZeRO-{info['zero_stage']} shards of {info['world_size']} "
                              f"ranks; resume on {info['world_size']} ranks with that stage (fsdp2 checkpoints "
                              f"reshard; `fastwidth export` reads any of them)")


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    measures_grad_norm = runs_loss_fn = False
    whole_checkpoint = False

    def __init__(self, cfg, env, block_params: int = 0, micro_steps: int = 1):
        super().__init__(cfg, env)
        self.ds = import_deepspeed(env.device.type == "cuda")
        self.sharded = cfg.dist.zero_stage == 3
        self.micro_steps = micro_steps
        self.ds_config = deepspeed_config(cfg, env.world_size, block_params, micro_steps)

    def build(self, name, model, table, wcfg, seed, construct=None):
        if not self.sharded or construct is None:  # ZeRO-1/2 hold whole fp32 parameters
            return super().build(name, model, table, wcfg, seed, construct)
        with self.ds.zero.Init(config_dict_or_path=copy.deepcopy(self.ds_config)):
            model = construct()
        # each block gathers as one unit, as under FSDP2: a block calls its norms' with_residual,
        # a method rather than their forward, which ZeRO-3's per-module hooks would not gather
        # for (size-0 weights in an evaluation forward of a single process, seen with depth 1)
        from deepspeed.utils import set_z3_leaf_module
        for unit in shard_units(model):
            if any(True for _ in unit.children()):  # a lone layer (an MLP's) has its own hooks already;
                set_z3_leaf_module(unit, True)      # as a leaf its backward saw size-0 weights (depth 24)
        self._checkpointing(model)
        init_zero_partitions(model, table, seed, wcfg.model.width, self.env.rank, init_depth(wcfg))
        model.reset_buffers()
        apply_forward_mults(model, table)
        return MemberHandle(self, name, model, table, wcfg, construct)

    def finish(self, h):
        model = h.model
        wrapper = LossForward(model)
        if self.sharded:  # model.loss reads the readout weight outside the readout's forward
            for p in (model.readout.weight, model.readout.bias):  # .weight: a tied readout's is the embedding's
                if p is not None:
                    self.ds.zero.register_external_parameter(wrapper, p)
            if not any(True for _ in model.readout.parameters()):  # tied: its own forward (logits) gathers it too
                self.ds.zero.register_external_parameter(model.readout, model.readout.weight)
        opt = (cpu_adam(model, h.table, h.wcfg) if self.cfg.dist.offload_optimizer else None) \
            or build_optimizer(model, h.table, h.wcfg)
        h.wrapped, h.optimizer, _, _ = self.ds.initialize(model=wrapper, optimizer=opt, config=copy.deepcopy(self.ds_config))
        return h

    def loss(self, h, x, y):
        return h.wrapped(x, y)

    def gathered(self, h):
        """ZeRO-1/2: the member's own (whole) model; ZeRO-3: a replica, each parameter's fp32
        master gathered one at a time (safe_get_full_fp32_param). Either way Adam's v̂ comes
        whole from DeepSpeed's flat partitions (safe_get_full_optimizer_state). Collective."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        opt, named = h.optimizer, dict(h.model.named_parameters())
        step = adam_step(opt)

        whole = zero12_states(opt) if not self.sharded and step is not None else {}

        def state_of(n):
            if step is None:
                return None
            sq = safe_get_full_optimizer_state(named[n], "exp_avg_sq") if self.sharded else whole.get(id(named[n]))
            return None if sq is None else (step, sq.detach())
        if not self.sharded:
            return contextlib.nullcontext(Whole(h.model, optimizer_view(h.model, h.table, h.wcfg, opt, state_of)))
        return contextlib.nullcontext(self.replica(h, lambda q: safe_get_full_fp32_param(q).detach(), state_of))

    def train_step(self, h, x, y, k=1, ctx=StepContext(), loss_fn=None):
        """DeepSpeed accumulates itself (gradient_accumulation_steps = k, loss scaled by 1/k in
        backward; step() applies only at the boundary and clips, steps and zeroes)."""
        engine = h.wrapped

        def backward(loss):
            engine.backward(loss)
            engine.step()
        return accumulate(lambda xi, yi: engine(xi, yi), backward, x, y, k, ctx)

    # ------------------------------------------------------------------ checkpoints

    def check_checkpoint(self, info, path):
        """Its own backend's shards, at this ZeRO stage, of this rank count (ZeRO-3 of another
        rank count reshards: load_members)."""
        super().check_checkpoint(info, path)
        check_zero_shards(info, self.env.world_size, self.cfg.dist.zero_stage, path)

    def _reshards(self, info: dict) -> bool:
        return info["world_size"] != self.env.world_size and info["zero_stage"] == 3

    def save_member(self, h, where):
        """DeepSpeed's save_checkpoint, then each rank rewrites the pickles it wrote as
        safetensors + JSON (zero_files), so that loading the checkpoint unpickles nothing."""
        h.wrapped.save_checkpoint(str(where.parent), tag=where.name, save_latest=False)
        zero_files.convert_member(where, self.env.rank)


    def load_member(self, h, where):
        # elastic_checkpoint (dist.deepspeed) has every rank read every rank's optimizer file
        elastic = self.ds_config["zero_optimization"].get("elastic_checkpoint", False)
        with zero_files.readable(where, self.cfg.train.trust_checkpoint, None if elastic else self.env.rank) as src:
            path, _ = h.wrapped.load_checkpoint(str(src.parent), tag=src.name,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"deepspeed could not load checkpoint {where}")

    def load_members(self, handles, path, info, member_dir):
        """As Engine's, but ZeRO-3 shards of another rank count go through DeepSpeed's universal
        checkpoint (load_universal), whose conversion is removed once every member is loaded."""
        if not self._reshards(info):
            return super().load_members(handles, path, info, member_dir)
        for h in handles:
            self.load_universal(h, path, member_dir(h.name))
        self.env.barrier()
        if self.env.is_main:
            shutil.rmtree(path.parent / f".universal-{path.name}", ignore_errors=True)

    def load_universal(self, h, path, where) -> None:
        """ZeRO-3 shards of another rank count: rank 0 converts the member's directory `where` of
        checkpoint `path` (step_N/engine/<name>) into DeepSpeed's universal checkpoint
        (deepspeed.checkpoint.ds_to_universal: every parameter's fp32 master and Adam state whole,
        under a hidden <checkpoints>/.universal-step_N), the other ranks wait, then every rank loads
        its new partition of it. Collective."""
        from types import SimpleNamespace
        out = path.parent / f".universal-{path.name}" / h.name
        if self.env.is_main:
            from deepspeed.checkpoint.ds_to_universal import main as to_universal
            shutil.rmtree(out, ignore_errors=True)
            with zero_files.readable(where, self.cfg.train.trust_checkpoint) as src:
                to_universal(SimpleNamespace(input_folder=str(src), output_folder=str(out),
                                             num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                             strict=True, inject_missing_state=False))
        self.env.barrier()
        handle, opt = h.wrapped, h.optimizer
        # the universal loader gives every param group the hyperparameters of the checkpoint's first
        # group (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3): µP's groups differ
        # in lr_mult / wd_mult, so each keeps its own (the optimizer state itself is per parameter)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        handle._config.load_universal_checkpoint = True
        try:
            loaded, _ = handle.load_checkpoint(str(out.parent), tag=h.name, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
        finally:
            handle._config.load_universal_checkpoint = False
        for g, own in zip(opt.param_groups, groups):
            g.update(own)
        # ... and one step tensor serves every group's state there: torch's Adam increments it in
        # place once per group, so each state gets its own copy (else t runs 2x fast after a resume)
        for st in getattr(opt, "optimizer", opt).state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
        if loaded is None:
            raise CheckpointError(f"deepspeed could not load the universal conversion of {where}")
