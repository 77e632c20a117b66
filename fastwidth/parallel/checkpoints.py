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
                                  torch.distributed.checkpoint through its safetensors storage
                                  (save_dcp): shard-<rank>-model-*.safetensors, each rank's
                                  pieces with their offsets in the header (so it loads on any
                                  number of ranks), and dcp.json, the optimizer's values that
                                  are not tensors (param groups);
                                  deepspeed: save_checkpoint(tag=<member>), its .pt files
                                  rewritten as safetensors + tagged JSON (parallel/zero_files.py;
                                  rebuilt in a private temporary directory to load); same number
                                  of ranks, or ZeRO-3 on another through load_universal

Nothing in it needs unpickling, and meta.json's "files" lists every file with its sha256, so
run/checkpoint.read_checkpoint verifies the whole directory before any engine reads it. A member
directory of the previous version (torch's pickled .metadata and .distcp files) is read by the
old loader only under --trust-checkpoint (run/checkpoint.refuse_unpicklable refuses it before).

Atomic as run/checkpoint.py's: every rank writes into one hidden directory, a barrier, then rank 0
writes meta.json, renames the directory into place and replaces `latest`; a rank that dies mid-save
leaves the previous checkpoint as the latest complete one. A write that fails inside an engine's
writer (a full disk under DCP or DeepSpeed's conversion) is raised as its OSError on every rank
once they agree (_save_member), so each prints trainer/faults.py's one line and Checkpointer.save
removes the temporary only after every rank stopped writing into it.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch

from fastwidth.errors import CheckpointError
from fastwidth.run import checkpoint as ckpt
from fastwidth.run.paths import checkpoint_name
from fastwidth.run.writes import os_error

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
        _save_member(env, m, member_dir(tmp, m.name))
    env.barrier()
    if env.is_main:
        meta = {"format": ckpt.FORMAT, "step": step, "files": ckpt.file_digests(tmp),
                "members": [{"name": m.name, "width": m.width, "seed": m.seed, "step": m.step} for m in members],
                **extra}
        ckpt.atomic_write_text(tmp / ckpt.META, json.dumps(meta))
        ckpt.publish(tmp, final, keep)
    env.barrier()
    return final


def _save_member(env, member, where: Path) -> None:
    """member.handle.save(where), and a write failure on any rank raised on every rank, as an
    OSError (Checkpointer.save names the checkpoint and removes the temporary). The ranks agree
    before any goes on: a rank that raised alone would leave the others waiting in the next
    member's collectives, and its clean-up would remove the directory they are still writing."""
    failure = None
    try:
        member.handle.save(where)
    except BaseException as err:  # DCP's CheckpointException is a BaseException
        failure = write_failure(err, where)
        if failure is None:
            raise
        if isinstance(err, RuntimeError):  # torch.save inside DeepSpeed's save_checkpoint: the other
            raise failure from None        # ranks may be in its closing barrier, which no all_reduce meets
    code = _max_over_ranks(env, failure.errno if failure else 0)
    if failure is not None:
        raise failure
    if code:
        raise OSError(code, os.strerror(code), str(where))  # another rank's disk


def write_failure(err: BaseException, where: Path) -> OSError | None:
    """`err` from an engine's writer as the OSError of the disk under it, or None when it is not a
    failed write: torch.distributed.checkpoint wraps each rank's error in CheckpointException
    (a BaseException, so no `except Exception` sees it); safetensors raises SafetensorError
    naming the IoError; DeepSpeed's conversion (zero_files) raises them as they come; torch.save's
    C++ writer, on a full disk, raises a RuntimeError from inline_container.cc with no errno
    ("unexpected pos 576 vs 534"), taken as ENOSPC when the file system has no space left."""
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException
    if isinstance(err, CheckpointException):
        found = (write_failure(exc, where) for exc, _ in err.failures.values())
        return next((f for f in found if f is not None), None)
    if isinstance(err, OSError) and err.errno is not None:
        return err if err.filename else OSError(err.errno, err.strerror, str(where))
    if isinstance(err, SafetensorError) and "IoError" in str(err):
        return os_error(err, where)
    if isinstance(err, RuntimeError) and TORCH_SAVE_WRITER in str(err) and _no_space_left(where):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))
    return None


TORCH_SAVE_WRITER = "inline_container.cc"  # where torch.save's zip writer raises


def _no_space_left(where: Path) -> bool:
    """Whether the file system holding `where` (or its nearest existing parent) is full."""
    existing = next((p for p in (Path(where), *Path(where).parents) if p.exists()), Path("/"))
    try:
        return os.statvfs(existing).f_bavail == 0
    except OSError:
        return False


def _max_over_ranks(env, code: int) -> int:
    if not env.active or env.world_size == 1:
        return code
    import torch.distributed as dist
    t = torch.tensor([code], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


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


# --------------------------------------------------------------------------- torch.distributed.checkpoint

DCP_JSON = "dcp.json"          # in a member's directory: its optimizer values that are not tensors
LEGACY_DCP = ".metadata"       # the previous version's pickled DCP index (read only when trusted)
MODEL_KEY, OPTIM_KEY = "model", "optim"


def _flat_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # optimizer state keyed by parameter name ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"):
    # tensors and plain values apart, and loadable on another sharding
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _state(model, optimizer) -> tuple[dict, dict]:
    """({"model": ..., "optim": tensors}, the optimizer's other values) of this rank's member."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, optimizer, options=_flat_options())
    tensors = {k: v for k, v in osd.items() if torch.is_tensor(v)}
    return {MODEL_KEY: msd, OPTIM_KEY: tensors}, {k: v for k, v in osd.items() if not torch.is_tensor(v)}


def save_dcp(where: Path, model, optimizer, is_main: bool) -> None:
    """A member's model and optimizer into directory `where`: tensors through
    torch.distributed.checkpoint's safetensors storage (HuggingFaceStorageWriter, every rank
    writing its own file; replicated tensors written once), the rest as JSON by rank 0. Collective."""
    import torch.distributed.checkpoint as dcp
    state, rest = _state(model, optimizer)
    dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(str(where), save_distributed=True))
    if is_main:
        ckpt.atomic_write_text(Path(where) / DCP_JSON, json.dumps(rest))


def load_dcp(where: Path, model, optimizer) -> None:
    """What save_dcp wrote in `where`, on any number of ranks (HuggingFaceStorageReader rebuilds
    the index from the safetensors headers); a previous version's member directory with the old
    loader (the checkpoint was trusted: refuse_unpicklable let it through). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    where = Path(where)
    if (where / LEGACY_DCP).is_file():
        msd, osd = get_state_dict(model, optimizer)
        state = {MODEL_KEY: msd, OPTIM_KEY: osd}
        dcp.load(state, checkpoint_id=str(where))
        set_state_dict(model, optimizer, model_state_dict=state[MODEL_KEY], optim_state_dict=state[OPTIM_KEY])
        return
    state, _ = _state(model, optimizer)
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(where)))
    rest = json.loads((where / DCP_JSON).read_text())
    set_state_dict(model, optimizer, model_state_dict=state[MODEL_KEY],
                   optim_state_dict={**rest, **state[OPTIM_KEY]}, options=_flat_options())


def is_dcp(where: Path) -> bool:
    """Whether member directory `where` was written by save_dcp (this version or the previous)."""
    return (Path(where) / DCP_JSON).is_file() or (Path(where) / LEGACY_DCP).is_file()


def dcp_model_tensors(where: Path) -> dict[str, torch.Tensor]:
    """The whole model state of the save_dcp member directory `where`, with no process group:
    each safetensors file's pieces put at the offsets its header records (DCP_SHARDING_INFO)."""
    from safetensors import safe_open
    prefix, pieces = MODEL_KEY + ".", {}
    for f in sorted(Path(where).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            info = json.loads((st.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
            for key in st.keys():
                if key.startswith(prefix):
                    t = st.get_tensor(key)
                    offsets = info.get(key, {}).get("saved_offsets", [0] * t.dim())
                    pieces.setdefault(key[len(prefix):], []).append((offsets, t))
    return {name: _assemble(parts) for name, parts in pieces.items()}


def _assemble(parts: list) -> torch.Tensor:
    """One tensor from its (offsets, piece) parts."""
    size = [max(o[d] + t.shape[d] for o, t in parts) for d in range(parts[0][1].dim())]
    whole = torch.zeros(size, dtype=parts[0][1].dtype)
    for offsets, t in parts:
        whole[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
    return whole
