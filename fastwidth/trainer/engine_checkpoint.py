"""Checkpoints through the engine: sharded ones in each engine's own format, inside fastwidth's
checkpoint directory (the single-process format is run/checkpoint.py; this module sits in trainer/,
above parallel/, whose engines it drives).

    step_000020/
        meta.json                 written by rank 0: step, members, µP tables, data cursor, RNG,
                                  stats state, config, and "engine": {backend, world_size, zero_stage}
        engine/<member>/          fsdp2: torch.distributed.checkpoint (model + optimizer, DTensor
                                  metadata, so it loads on any number of ranks);
                                  deepspeed: save_checkpoint(tag=<member>) (same number of ranks;
                                  ZeRO-3 on another: load_universal converts it)

ddp holds whole replicas, so rank 0 writes the single-process format (it resumes anywhere).
Atomicity as in checkpoint.py: every rank writes into one hidden directory, a barrier, then
rank 0 writes meta.json, renames the directory into place and replaces `latest`; a rank that dies
mid-save leaves the previous checkpoint as the latest complete one.
`export_checkpoint` turns any of them into one safetensors file (no process group needed).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fastwidth.errors import CheckpointError
from fastwidth.run import checkpoint as ckpt
from fastwidth.run.paths import RunDir, checkpoint_name, latest_pointer


def _engine_dir(path: Path, name: str) -> Path:
    return Path(path) / "engine" / name


def save_member(engine, name: str, where: Path) -> None:
    if engine.name in ("fsdp2", "ddp"):  # ddp: a replicated member of a mixed placement (DCP dedups it)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(engine.models[name], engine.optimizers[name])
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(where))
    else:  # deepspeed
        engine.handles[name].save_checkpoint(str(where.parent), tag=where.name, save_latest=False)


def load_member(engine, name: str, where: Path) -> None:
    if engine.name in ("fsdp2", "ddp"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model, opt = engine.models[name], engine.optimizers[name]
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(where))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        path, _ = engine.handles[name].load_checkpoint(str(where.parent), tag=where.name,
                                                       load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"deepspeed could not load checkpoint {where}")


def save(engine, env, ckpt_root: Path, step: int, members: list, extra: dict, keep: int, engine_of=None) -> Path:
    """Collective: every rank calls it at the same step. engine_of(name): the engine of a member
    (placement per width); default `engine` for all."""
    ckpt_root = Path(ckpt_root)
    engine_of = engine_of or (lambda _name: engine)
    if engine.name == "ddp":
        path = None
        if env.is_main:
            path = ckpt.save_checkpoint(ckpt_root, step, members, extra, keep=keep)
        env.barrier()
        return path or ckpt_root / checkpoint_name(step)
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / f".tmp-{final.name}"
    if env.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        prune_stale(ckpt_root)
        ckpt.recover_set_aside(ckpt_root)
        (tmp / "engine").mkdir(parents=True)
    env.barrier()
    for i, m in enumerate(members):
        if i == len(members) - 1:
            env.maybe_die(f"save{step}")  # test hook: a rank lost in the middle of a save
        save_member(engine_of(m.name), m.name, _engine_dir(tmp, m.name))
    env.barrier()
    if env.is_main:
        info = {"backend": engine.name, "world_size": env.world_size, "zero_stage": engine.cfg.dist.zero_stage}
        meta = {"format": ckpt.FORMAT, "step": step, "files": {}, "engine": info,
                "members": [{"name": m.name, "width": m.width, "seed": m.seed, "step": m.step} for m in members],
                **extra}
        ckpt.atomic_write_text(tmp / ckpt.META, json.dumps(meta))
        ckpt.publish(tmp, final, keep)
    env.barrier()
    return final


def prune_stale(ckpt_root: Path) -> list[str]:
    """Remove hidden .tmp-* directories: saves that never completed (a rank or the job died)."""
    gone = []
    for p in Path(ckpt_root).glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p.name)
    return gone


def check_resumable(cfg, world_size: int) -> None:
    """Refuse, from the latest checkpoint's meta.json and before any engine or model is built, a
    resume that DeepSpeed cannot load: another ZeRO stage, or ZeRO-1/2 shards on another rank
    count (ZeRO-3 reshards through the universal checkpoint: load_universal). (restore
    checks the same again once the checkpoint is verified). Read-only: the `latest` pointer and
    one JSON file."""
    if not cfg.train.resume or cfg.dist.backend != "deepspeed":
        return
    root = RunDir(cfg.train.out_dir).checkpoints
    pointer = latest_pointer(root)
    meta_file = root / pointer.read_text().strip() / ckpt.META if pointer.is_file() else None
    if meta_file is None or not meta_file.is_file():
        return                                   # check_run_dir reports a missing checkpoint
    try:
        info = json.loads(meta_file.read_text()).get("engine") or {}
    except (OSError, ValueError):
        return                                   # read_checkpoint reports a corrupt one
    other_world = info.get("world_size") != world_size and info.get("zero_stage") != 3  # ZeRO-3 reshards
    if info.get("backend") == "deepspeed" and (other_world or info["zero_stage"] != cfg.dist.zero_stage):
        raise CheckpointError(f"checkpoint {meta_file.parent} holds ZeRO-{info['zero_stage']} shards of "
                              f"{info['world_size']} ranks; resume on {info['world_size']} ranks with that stage "
                              f"(fsdp2 checkpoints reshard; `fastwidth export` reads any of them)")


def restore(engine, env, members: list, meta: dict, path: Path, engine_of=None) -> None:
    """Load every member from checkpoint `path` (meta from ckpt.read_checkpoint)."""
    engine_of = engine_of or (lambda _name: engine)
    info = meta.get("engine")
    if engine is None or engine.name == "ddp":
        if info is not None:
            raise CheckpointError(f"checkpoint {path} was saved by dist.backend={info['backend']}; resume it with "
                                  f"that backend, or export it with `fastwidth export {path}`")
        for m in members:
            ckpt.restore_member(m, meta)
        return
    if info is None or info["backend"] != engine.name:
        got = info["backend"] if info else "none/ddp"
        raise CheckpointError(f"checkpoint {path} was saved by dist.backend={got}, this run uses {engine.name}")
    reshard = engine.name == "deepspeed" and info["world_size"] != env.world_size and info["zero_stage"] == 3
    if engine.name == "deepspeed" and not reshard and (info["world_size"] != env.world_size
                                                       or info["zero_stage"] != engine.cfg.dist.zero_stage):
        raise CheckpointError(f"checkpoint {path} holds ZeRO-{info['zero_stage']} shards of {info['world_size']} "
                              f"ranks; resume on {info['world_size']} ranks with that stage (fsdp2 checkpoints reshard)")
    for m in members:
        entry = next((e for e in meta["members"] if e["name"] == m.name), None)
        if entry is None:
            raise CheckpointError(f"checkpoint {path} has no model {m.name}")
        if reshard and engine_of(m.name) is engine:
            load_universal(engine, env, path, m.name)
        else:
            load_member(engine_of(m.name), m.name, _engine_dir(path, m.name))
        m.step = int(entry["step"])
    if reshard:
        env.barrier()
        if env.is_main:
            shutil.rmtree(path.parent / f".universal-{path.name}", ignore_errors=True)


def load_universal(engine, env, path: Path, name: str) -> None:
    """ZeRO-3 shards of another rank count: rank 0 converts step_N/engine/<name> into DeepSpeed's
    universal checkpoint (deepspeed.checkpoint.ds_to_universal: every parameter's fp32 master and
    Adam state whole, under a hidden <checkpoints>/.universal-step_N, removed after loading), the
    other ranks wait, then every rank loads its new partition of it. Collective."""
    from types import SimpleNamespace
    out = path.parent / f".universal-{path.name}" / name
    if env.is_main:
        from deepspeed.checkpoint.ds_to_universal import main as to_universal
        shutil.rmtree(out, ignore_errors=True)
        to_universal(SimpleNamespace(input_folder=str(_engine_dir(path, name)), output_folder=str(out),
                                     num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                     strict=True, inject_missing_state=False))
    env.barrier()
    handle, opt = engine.handles[name], engine.optimizers[name]
    # the universal loader gives every param group the hyperparameters of the checkpoint's first
    # group (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3): µP's groups differ
    # in lr_mult / wd_mult, so each keeps its own (the optimizer state itself is per parameter)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    handle._config.load_universal_checkpoint = True
    try:
        loaded, _ = handle.load_checkpoint(str(out.parent), tag=name, load_optimizer_states=True,
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
        raise CheckpointError(f"deepspeed could not load the universal conversion of {_engine_dir(path, name)}")


# --------------------------------------------------------------------------- export

def _member_state(path: Path, meta: dict, name: str) -> dict[str, torch.Tensor]:
    info = meta.get("engine")
    if info is None:
        return dict(meta["tensors"][f"model.{name}.safetensors"])
    where = _engine_dir(path, name)
    if info["backend"] == "fsdp2" or (where / ".metadata").is_file():  # DCP (also ddp members of a mixed run)
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        with tempfile.TemporaryDirectory() as d:
            dcp_to_torch_save(str(where), os.path.join(d, "full.pt"))
            return dict(torch.load(os.path.join(d, "full.pt"), weights_only=True)["model"])
    from fastwidth.parallel.zero import import_deepspeed
    import_deepspeed(torch.cuda.is_available())
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    sd = get_fp32_state_dict_from_zero_checkpoint(str(where.parent), tag=where.name)
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}


def export_checkpoint(path: Path, out: Path, member: str | None = None) -> list[str]:
    """Write one safetensors file with the full (unsharded) fp32 weights of a checkpoint.

    One member: plain parameter names; several: '<member>/<name>'. The µP tables ride along in
    the file's metadata (JSON). Returns the members written.
    """
    from safetensors.torch import save_file
    path = Path(path)
    if latest_pointer(path).is_file() or RunDir(path).checkpoints.is_dir():
        root = RunDir(path).checkpoints if RunDir(path).checkpoints.is_dir() else path
        found = ckpt.latest_checkpoint(root)
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint")
        path = found
    meta = ckpt.read_checkpoint(path)
    names = [e["name"] for e in meta["members"]]
    if member is not None and member not in names:
        raise CheckpointError(f"checkpoint {path} has no model {member} (it holds {', '.join(names)})")
    chosen = [member] if member else names
    tensors = {}
    for name in chosen:
        for k, v in _member_state(path, meta, name).items():
            tensors[k if len(chosen) == 1 else f"{name}/{k}"] = v.detach().float().contiguous()
    tables = {n: meta.get("mup_tables", {}).get(n) for n in chosen}
    save_file(tensors, str(out), metadata={"format": "fastwidth-export-1", "step": str(meta["step"]),
                                           "members": json.dumps(chosen), "mup_tables": json.dumps(tables)})
    return chosen
