"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

Layout of one checkpoint (a directory under RUN/checkpoints/):
    step_000020/
        meta.json                     step, members, optimizer scalars, RNG, data cursor, µP tables,
                                      and the sha256 of every tensor file (truncation is detected)
        model.<member>.safetensors    model state_dict
        optim.<member>.safetensors    optimizer tensor state ("<param index>.<key>")
    latest                            name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory, each file fsynced, then renamed into
place and `latest` replaced by rename: a crash leaves either the old or the new checkpoint, never
a half-written one. A checkpoint of the same name that the new one replaces is first renamed to
`.replaced-<name>` and deleted only once the new one is in place; the next save or load puts a
set-aside checkpoint back if the kill came in between.

Reading runs no code from the checkpoint: every reader (export, load_model, resume) goes through
read_checkpoint, which type-checks meta.json, refuses a file that is not a listed safetensors or
JSON file (refuse_unpicklable: torch's and DeepSpeed's loaders would unpickle it) unless the user
trusts the checkpoint, and verifies every listed file's sha256 before anything is loaded.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastwidth.errors import CheckpointError
from fastwidth.run.paths import checkpoint_dirs, checkpoint_name, latest_pointer

FORMAT = "fastwidth-checkpoint-1"
META = "meta.json"   # in every checkpoint directory, of every engine's format


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digests(directory: Path) -> dict[str, str]:
    """{path relative to `directory`: sha256} of every file under it but meta.json (which lists
    them): a sharded checkpoint's "files", written once every rank's part is in place."""
    directory = Path(directory)
    return {f.relative_to(directory).as_posix(): _sha256(f) for f in sorted(directory.rglob("*"))
            if f.is_file() and f.relative_to(directory).as_posix() != META}


# --------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    """torch's CPU (and CUDA) generator states; fastwidth draws no numbers from Python's or numpy's."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


# --------------------------------------------------------------------------- optimizer state

def split_optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for safetensors, JSON-able rest) of an optimizer's state_dict."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = val
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def merge_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, val in list(tensors.items()) + list(rest["scalars"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": rest["param_groups"]}


# --------------------------------------------------------------------------- save / load

def save_checkpoint(ckpt_root: Path, step: int, members: list, extra: dict, keep: int = 2) -> Path:
    """Write checkpoint `step_<step>` for `members` (objects with .name, .model, .optimizer)."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / checkpoint_name(step)
    clear_interrupted(ckpt_root)
    tmp = ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    files, member_meta = {}, []
    for m in members:
        model_file = f"model.{m.name}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in m.model.state_dict().items()}, str(tmp / model_file))
        opt_tensors, opt_rest = split_optimizer_state(m.optimizer)
        optim_file = f"optim.{m.name}.safetensors"
        save_file(opt_tensors, str(tmp / optim_file))
        for f in (model_file, optim_file):
            _fsync_file(tmp / f)
            files[f] = _sha256(tmp / f)
        member_meta.append({"name": m.name, "width": m.width, "seed": m.seed, "step": m.step,
                            "optimizer": opt_rest})
    meta = {"format": FORMAT, "step": step, "members": member_meta, "files": files, **extra}
    with open(tmp / META, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    publish(tmp, final, keep)
    return final


def publish(tmp: Path, final: Path, keep: int) -> None:
    """Make the complete checkpoint directory `tmp` the checkpoint `final`, point `latest` at it and
    prune to `keep`. A checkpoint of the same name (the final save at a periodic checkpoint's step;
    sequential sweeps, named by their slowest member, rewrite one name) is set aside by rename, not
    deleted first, so a kill between the two renames still leaves it whole (recover_set_aside)."""
    ckpt_root = final.parent
    aside = ckpt_root / f"{ASIDE}{final.name}"
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    atomic_write_text(latest_pointer(ckpt_root), final.name + "\n")
    shutil.rmtree(aside, ignore_errors=True)
    _prune(ckpt_root, keep)


ASIDE = ".replaced-"   # a checkpoint being replaced by one of the same name


def clear_interrupted(ckpt_root: Path) -> None:
    """Before a save: remove the hidden .tmp-* directories of saves that never completed (kill -9,
    node loss, a rank that died) and put back a checkpoint a kill left set aside."""
    for stale in Path(ckpt_root).glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    recover_set_aside(Path(ckpt_root))


def recover_set_aside(ckpt_root: Path) -> None:
    """Undo a replacement that a kill interrupted: a set-aside checkpoint whose name is free again
    goes back (it is the newest whole one); one whose replacement landed is deleted."""
    for aside in ckpt_root.glob(f"{ASIDE}step_*"):
        final = ckpt_root / aside.name[len(ASIDE):]
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)


def _prune(ckpt_root: Path, keep: int) -> None:
    for old in checkpoint_dirs(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_latest_pointer(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` names in `ckpt_root`, or None when there is no pointer or the
    directory it names is gone. Refuses (CheckpointError, one line) a pointer that names
    anything but a step_N directory of this checkpoints/ (../, an absolute path, a link out):
    resume, export and load_model would otherwise read a checkpoint from outside the run."""
    pointer = latest_pointer(ckpt_root)
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        raise CheckpointError(f"{pointer} cannot be read as text; it should name a step_N checkpoint") from None
    if not name:
        return None
    found = Path(ckpt_root) / name
    inside = _STEP_NAME.fullmatch(name) and not found.is_symlink()
    if not inside:
        raise CheckpointError(f"{pointer} names {name!r}, outside {ckpt_root}; it must name one of its "
                              f"step_N checkpoint directories (delete it to resume from the newest one)")
    return found if found.is_dir() else None


_STEP_NAME = re.compile(r"step_\d+")


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` names (read_latest_pointer), else the newest step_N directory."""
    ckpt_root = Path(ckpt_root)
    if ckpt_root.is_dir():
        recover_set_aside(ckpt_root)
    found = read_latest_pointer(ckpt_root)
    if found is not None:
        return found
    done = [d for d in checkpoint_dirs(ckpt_root) if not d.is_symlink()]
    return done[-1] if done else None


# --------------------------------------------------------------------------- reading

TENSOR_FILE, JSON_FILE = ".safetensors", ".json"   # the only files a checkpoint holds


def refuse_unpicklable(path: Path, trust: bool = False, meta: dict | None = None) -> None:
    """Refuse (CheckpointError, one line) checkpoint `path` when it holds a file that is not a
    safetensors or JSON file listed with its sha256 in meta.json "files": torch's and
    DeepSpeed's own loaders unpickle such files (.metadata, .distcp, .pt, .bin, .pkl), and
    unpickling runs whatever code the file names. `trust` (--trust-checkpoint,
    train.trust_checkpoint) lets the old loaders read a checkpoint written by an earlier version.
    Called by every reader before any loader sees the directory; meta: its meta.json (read here
    when not given)."""
    if trust:
        return
    path = Path(path)
    if meta is None:
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            meta = {}
    files = meta.get("files") if isinstance(meta, dict) else None
    listed = set(files) if isinstance(files, dict) else set()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        if f.is_dir() and not f.is_symlink() or rel == META:
            continue
        plain = f.is_file() and not f.is_symlink() and f.name.endswith((TENSOR_FILE, JSON_FILE))
        if not plain or rel not in listed:
            raise unpicklable_error(f, "is not a safetensors or JSON file" if not plain
                                    else "is not listed in its meta.json")


def unpicklable_error(f: Path, why: str) -> CheckpointError:
    """The one line refusing checkpoint file `f` (`why`: what it is) that a loader would unpickle."""
    return CheckpointError(f"checkpoint file {f} {why}: loading it could run code; a checkpoint written by this "
                           f"version holds only listed safetensors and JSON; pass --trust-checkpoint "
                           f"(trust_checkpoint=True) only if you trust who wrote it")


def read_checkpoint(path: Path, trust: bool = False) -> dict:
    """Read and verify a checkpoint; returns meta plus 'tensors' {file: {name: tensor}} (the
    single-process format's; a sharded checkpoint's files are verified, not loaded: its engine
    reads each rank's part).

    Raises CheckpointError (one line) for a missing, truncated, corrupt or malformed checkpoint,
    or one that holds a file that would need unpickling (refuse_unpicklable; `trust` allows it).
    """
    path = Path(path)
    meta_file = path / META
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no meta.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {meta_file} is truncated or not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {meta_file} is not a {FORMAT} checkpoint")
    check_meta(meta, meta_file)
    refuse_unpicklable(path, trust, meta)
    for fname, digest in meta["files"].items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {fname}")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is truncated or corrupt (checksum mismatch)")
    tensors = {}
    if meta.get("engine") is None:
        for fname in meta["files"]:
            try:
                tensors[fname] = load_file(str(path / fname))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"checkpoint file {path / fname} cannot be read: {e}") from None
    meta["tensors"] = tensors
    return meta


def check_meta(meta: dict, meta_file: Path) -> None:
    """Refuse, naming the field, a meta.json whose fields have the wrong types (a hand edit, a
    tool's output): every reader indexes them without further checks."""
    def bad(field: str, valid: str):
        return CheckpointError(f"checkpoint {meta_file}: field {field} must be {valid}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)
    if not is_int(meta.get("step")):
        raise bad("step", "an integer")
    members = meta.get("members")
    if not isinstance(members, list) or not members:
        raise bad("members", "a non-empty list of {name, width, seed, step}")
    for i, e in enumerate(members):
        if not isinstance(e, dict):
            raise bad(f"members[{i}]", "an object {name, width, seed, step}")
        name = e.get("name")
        if not isinstance(name, str) or not _MEMBER_NAME.fullmatch(name):
            raise bad(f"members[{i}].name", "a model name such as w64_s0 (letters, digits, _ . -)")
        for key in ("width", "seed", "step"):
            if not is_int(e.get(key)):
                raise bad(f"members[{i}].{key}", "an integer")
        opt = e.get("optimizer")
        if "engine" not in meta and not (isinstance(opt, dict) and isinstance(opt.get("param_groups"), list)
                                         and isinstance(opt.get("scalars"), dict)):
            raise bad(f"members[{i}].optimizer", "an object {param_groups: [...], scalars: {...}}")
    files = meta.get("files")
    if not isinstance(files, dict):
        raise bad("files", "an object {file name: sha256}")
    for fname, digest in files.items():
        if Path(fname).is_absolute() or ".." in Path(fname).parts or not fname:
            raise bad(f"files[{fname!r}]", "a path inside the checkpoint directory")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise bad(f"files[{fname!r}]", "a sha256 of 64 hex digits")
    engine = meta.get("engine")
    if "engine" in meta and not (isinstance(engine, dict) and isinstance(engine.get("backend"), str)
                                 and is_int(engine.get("world_size")) and is_int(engine.get("zero_stage"))):
        raise bad("engine", "an object {backend, world_size, zero_stage} (or absent)")


_MEMBER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def restore_member(member, meta: dict) -> None:
    """Load one member's model and optimizer state from a verified checkpoint."""
    entry = next((e for e in meta["members"] if e["name"] == member.name), None)
    if entry is None:
        raise CheckpointError(f"checkpoint has no model {member.name} (it holds "
                              f"{', '.join(e['name'] for e in meta['members'])})")
    model_sd = meta["tensors"][f"model.{member.name}.safetensors"]
    try:
        member.model.load_state_dict(model_sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint model {member.name} does not match the config: {first}") from None
    opt_sd = merge_optimizer_state(meta["tensors"][f"optim.{member.name}.safetensors"], entry["optimizer"])
    member.optimizer.load_state_dict(opt_sd)
    member.step = int(entry["step"])
