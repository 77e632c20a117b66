"""How the engines write a checkpoint: the single-process format when every rank holds each
member whole, else the sharded layout, each member by its own engine.

    path = engine.save(ckpt_root, step, members, extra, keep)   # Engine.save: one of the two below
    engine.load(members, meta, path)

Whole (one process, ddp; Engine.whole_checkpoint): rank 0 writes run/checkpoint.py's format (it
resumes on any number of ranks). Sharded (fsdp2, deepspeed):

    step_000020/
        meta.json                 written by rank 0: step, members, µP tables, data cursor, RNG,
                                  stats state, config, and "engine": {backend, world_size, zero_stage}
        engine/<member>/          fsdp2 (and the ddp members of a mixed placement):
                                  torch.distributed.checkpoint (model + optimizer, DTensor
                                  metadata, so it loads on any number of ranks);
                                  deepspeed: save_checkpoint(tag=<member>) (same number of ranks;
                                  ZeRO-3 on another: DeepSpeedEngine.load_universal converts it)

Atomic as run/checkpoint.py's: every rank writes into one hidden directory, a barrier, then rank 0
writes meta.json, renames the directory into place and replaces `latest`; a rank that dies mid-save
leaves the previous checkpoint as the latest complete one.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastwidth.errors import CheckpointError
from fastwidth.run import checkpoint as ckpt
from fastwidth.run.paths import checkpoint_name

ENGINE_DIR = "engine"  # the members' directories of a sharded checkpoint


def member_dir(path: Path, name: str) -> Path:
    """Member `name`'s directory in the sharded checkpoint `path`."""
    return Path(path) / ENGINE_DIR / name


def save_whole(env, ckpt_root: Path, step: int, members: list, extra: dict, keep: int) -> Path:
    """Rank 0 writes the single-process format of `members` (each whole on every rank). Collective."""
    path = ckpt.save_checkpoint(ckpt_root, step, members, extra, keep=keep) if env.is_main else None
    env.barrier()
    return path or Path(ckpt_root) / checkpoint_name(step)


def save_sharded(env, ckpt_root: Path, step: int, members: list, extra: dict, keep: int) -> Path:
    """Checkpoint `step` of `members`, each written by its own engine (member.handle.save) into
    engine/<member>/, and meta.json holding `extra` (with "engine"). Collective."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / f".tmp-{final.name}"
    if env.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        ckpt.clear_interrupted(ckpt_root)
        (tmp / ENGINE_DIR).mkdir(parents=True)
    env.barrier()
    for i, m in enumerate(members):
        if i == len(members) - 1:
            env.maybe_die(f"save{step}")  # test hook: a rank lost in the middle of a save
        m.handle.save(member_dir(tmp, m.name))
    env.barrier()
    if env.is_main:
        meta = {"format": ckpt.FORMAT, "step": step, "files": {},
                "members": [{"name": m.name, "width": m.width, "seed": m.seed, "step": m.step} for m in members],
                **extra}
        ckpt.atomic_write_text(tmp / ckpt.META, json.dumps(meta))
        ckpt.publish(tmp, final, keep)
    env.barrier()
    return final


def load_sharded(members: list, meta: dict, path: Path) -> None:
    """Every member from the sharded checkpoint `path` (meta: its read_checkpoint), each by its
    own engine (Engine.load_members: one call per engine), and its step. Collective."""
    entries = {e["name"]: e for e in meta["members"]}
    missing = [m.name for m in members if m.name not in entries]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no model {missing[0]}")
    by_engine: dict = {}
    for m in members:
        by_engine.setdefault(m.handle.engine, []).append(m.handle)
    for engine, handles in by_engine.items():
        engine.load_members(handles, Path(path), meta["engine"], lambda name: member_dir(path, name))
    for m in members:
        m.step = int(entries[m.name]["step"])
