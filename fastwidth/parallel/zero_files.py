"""DeepSpeed's checkpoint files kept as safetensors + JSON, so that loading one unpickles nothing.

DeepSpeed writes each member as torch.save pickles (mp_rank_00_model_states.pt,
zero_pp_rank_<r>_mp_rank_00_optim_states.pt, ...) and its loaders read them back with pickle,
which runs whatever code a planted file names. So, right after DeepSpeed saves a member into the
hidden .tmp checkpoint this very process is writing, every .pt file it wrote is read back with
torch.load(weights_only=True) (only the DeepSpeed classes of ALLOWED may be named) and rewritten:

    <stem>.safetensors    every tensor of the file, keyed "0", "1", ... in the order met
    <stem>.json           {"format", "tree"}: the file's structure; a tensor is {"@": "tensor",
                          "key": "3"}; a tuple, OrderedDict, torch.Size, torch.dtype, non-finite
                          float, dict with keys other than strings, and each class of ALLOWED
                          is an object tagged "@"

and the .pt file is deleted. To load (resume, ZeRO-3 resharding, export), `readable` rebuilds
the .pt files from those two in a private scratch directory outside the run (deleted after) and
DeepSpeed reads that. Decoding constructs only the types named here: an unknown tag is a
CheckpointError naming the file. A member directory with .pt files and no JSON is a checkpoint of
an earlier version: its files reach DeepSpeed only with trust (--trust-checkpoint).
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import pickle
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from fastwidth.errors import CheckpointError
from fastwidth.run.checkpoint import atomic_write_text, unpicklable_error

FORMAT = "fastwidth-deepspeed-1"
TAG = "@"
# Every class DeepSpeed 0.19 puts in a ZeRO-1/2/3 checkpoint besides tensors and containers
# (seen with pickletools on fp32 and bf16 checkpoints), by how its value is kept:
#   enum: its value; dataclass: its fields; object: its __dict__ (what pickle itself restores)
ALLOWED = {"ZeroStageEnum": ("deepspeed.runtime.zero.config", "enum"),
           "fragment_address": ("deepspeed.utils.tensor_fragment", "dataclass"),
           "LossScaler": ("deepspeed.runtime.fp16.loss_scaler", "object"),
           "DynamicLossScaler": ("deepspeed.runtime.fp16.loss_scaler", "object")}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


def allowed_class(name: str) -> type:
    """The DeepSpeed class ALLOWED names `name`, imported only when a file holds one (its callers,
    the DeepSpeed engine and export, have imported deepspeed for this machine: zero.import_deepspeed)."""
    import importlib
    return getattr(importlib.import_module(ALLOWED[name][0]), name)


# --------------------------------------------------------------------------- encode

def encode(value, tensors: dict[str, torch.Tensor]):
    """`value` (a torch.load'ed DeepSpeed state) as JSON data; its tensors are added to `tensors`."""
    # exact types: an int enum (ZeroStageEnum) or a str subclass is not a plain int or str
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        return value if math.isfinite(value) else {TAG: "float", "v": repr(value)}
    if isinstance(value, torch.Tensor):
        return _encode_tensor(value, tensors)
    if isinstance(value, torch.Size):
        return {TAG: "torch.Size", "v": list(value)}
    if isinstance(value, torch.dtype):
        return {TAG: "torch.dtype", "v": str(value).removeprefix("torch.")}
    if type(value) is list:
        return [encode(v, tensors) for v in value]
    if type(value) is tuple:
        return {TAG: "tuple", "v": [encode(v, tensors) for v in value]}
    if isinstance(value, collections.OrderedDict) or (type(value) is dict and not _plain_keys(value)):
        items = [[encode(k, tensors), encode(v, tensors)] for k, v in value.items()]
        return {TAG: "OrderedDict" if isinstance(value, collections.OrderedDict) else "dict", "items": items}
    if type(value) is dict:
        return {k: encode(v, tensors) for k, v in value.items()}
    return _encode_object(value, tensors)


def _plain_keys(d: dict) -> bool:
    return all(type(k) is str for k in d) and TAG not in d


def _encode_tensor(t: torch.Tensor, tensors: dict) -> dict:
    key = str(len(tensors))
    t = t.detach().cpu()
    # safetensors holds one contiguous buffer per tensor: a view into a larger (shared) storage
    # is copied, which loads the same values (DeepSpeed copies loaded tensors into its own)
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)
    tensors[key] = t
    return {TAG: "tensor", "key": key}


def _encode_object(value, tensors: dict) -> dict:
    name = type(value).__name__
    if name not in ALLOWED or type(value) is not allowed_class(name):
        raise TypeError(f"{type(value).__module__}.{name} is not among the DeepSpeed classes fastwidth converts")
    kind = ALLOWED[name][1]
    if kind == "enum":
        return {TAG: name, "v": encode(value.value, tensors)}
    return {TAG: name, "state": {k: encode(v, tensors) for k, v in vars(value).items()}}


# --------------------------------------------------------------------------- decode

def decode(data, tensors: dict[str, torch.Tensor], where: Path):
    """The value `encode` made (JSON data + its tensors); only the types named in this module are
    constructed. An unknown tag or a missing tensor is a CheckpointError naming `where`."""
    if isinstance(data, list):
        return [decode(v, tensors, where) for v in data]
    if not isinstance(data, dict):
        return data
    if TAG not in data:
        return {k: decode(v, tensors, where) for k, v in data.items()}
    tag = data[TAG]
    try:
        return _decode_tagged(tag, data, tensors, where)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint file {where}: malformed {tag!r} entry ({type(e).__name__}: {e})") from None


def _decode_tagged(tag, data: dict, tensors: dict, where: Path):
    if tag == "tensor":
        t = tensors.get(data["key"])
        if t is None:
            raise CheckpointError(f"checkpoint file {where} names tensor {data['key']!r}, which its safetensors lacks")
        return t
    if tag == "float":
        return float({"nan": "nan", "inf": "inf", "-inf": "-inf"}[data["v"]])
    if tag == "tuple":
        return tuple(decode(data["v"], tensors, where))
    if tag in ("dict", "OrderedDict"):
        items = ((decode(k, tensors, where), decode(v, tensors, where)) for k, v in data["items"])
        return collections.OrderedDict(items) if tag == "OrderedDict" else dict(items)
    if tag == "torch.Size":
        return torch.Size([int(v) for v in data["v"]])
    if tag == "torch.dtype":
        return _DTYPES[data["v"]]
    if tag not in ALLOWED:
        raise CheckpointError(f"checkpoint file {where} holds type tag {tag!r}; a DeepSpeed checkpoint written "
                              f"by fastwidth holds only {', '.join(sorted(_TAGS + tuple(ALLOWED)))}")
    cls, kind = allowed_class(tag), ALLOWED[tag][1]
    if kind == "enum":
        return cls(decode(data["v"], tensors, where))
    state = decode(data["state"], tensors, where)
    if not isinstance(state, dict) or not all(type(k) is str for k in state):
        raise TypeError("its state must be an object of named fields")
    if kind == "dataclass":
        return cls(**state)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


_TAGS = ("tensor", "float", "tuple", "dict", "OrderedDict", "torch.Size", "torch.dtype")


# --------------------------------------------------------------------------- files

def _safe_globals() -> list:
    """The classes torch.load(weights_only=True) may construct from a file DeepSpeed just wrote."""
    return [allowed_class(name) for name in ALLOWED]


def convert_file(pt: Path) -> None:
    """Rewrite DeepSpeed's `pt` (written by this process) as <stem>.safetensors + <stem>.json and
    delete it. A class outside ALLOWED (a newer DeepSpeed) fails here, at save, naming the file."""
    from safetensors.torch import save_file
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            state = torch.load(pt, map_location="cpu", weights_only=True)
        tensors: dict[str, torch.Tensor] = {}
        tree = encode(state, tensors)
    except (TypeError, RuntimeError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"cannot convert DeepSpeed's {pt} to safetensors + JSON: "
                              f"{str(e).strip().splitlines()[0]}") from None
    save_file(tensors, str(pt.with_suffix(".safetensors")), metadata={"format": FORMAT})
    atomic_write_text(pt.with_suffix(".json"), json.dumps({"format": FORMAT, "tree": tree}))
    pt.unlink()


def written_by(name: str, rank: int) -> bool:
    """Whether data-parallel rank `rank` writes DeepSpeed's member file `name`: zero_pp_rank_<r>_*
    rank r, the others (ZeRO-1/2's mp_rank_00_model_states.pt) rank 0."""
    return f"zero_pp_rank_{rank}_" in name if "zero_pp_rank_" in name else rank == 0


def read_by(name: str, rank: int) -> bool:
    """Whether DeepSpeed's loader on data-parallel rank `rank` reads member file `name`: its own
    zero_pp_rank_<rank>_* files and every rank's shared ones (without elastic_checkpoint, off here)."""
    return f"zero_pp_rank_{rank}_" in name if "zero_pp_rank_" in name else True


def convert_member(where: Path, rank: int) -> None:
    """After DeepSpeed saved a member into `where` (save_checkpoint(where.parent, tag=where.name)):
    convert the .pt files this rank wrote, and drop the recovery scripts DeepSpeed copies beside
    the member (zero_to_fp32.py: code in a checkpoint; fastwidth export does their job)."""
    for pt in sorted(where.glob("*.pt")):
        if written_by(pt.name, rank):
            convert_file(pt)
    if rank == 0:
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):
            (where.parent / script).unlink(missing_ok=True)


def is_converted(where: Path) -> bool:
    """Whether member directory `where` holds fastwidth's safetensors + JSON (else: an earlier
    version's pickles, or nothing)."""
    return any(where.glob("*.json"))


def read_file(tree_file: Path):
    """The state DeepSpeed saved as <stem>.pt, from <stem>.json and <stem>.safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        doc = json.loads(tree_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {tree_file} cannot be read as JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "tree" not in doc:
        raise CheckpointError(f"checkpoint file {tree_file} is not a {FORMAT} file")
    tensor_file = tree_file.with_suffix(".safetensors")
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint file {tensor_file} cannot be read: {e}") from None
    return decode(doc["tree"], tensors, tree_file)


@contextlib.contextmanager
def readable(where: Path, trust: bool, rank: int | None = None) -> Iterator[Path]:
    """A directory named like member directory `where` that DeepSpeed's loaders can read: a
    private scratch copy (tempfile, removed on exit) of its .pt files rebuilt from safetensors +
    JSON (rank: only the files that data-parallel rank reads; None: all), or, for a checkpoint of
    an earlier version (pickles only), `where` itself when `trust` allows it."""
    where = Path(where)
    pickles = sorted(where.glob("*.pt"))
    if pickles and not trust:  # beside converted files too: one planted there replaces a member's state
        raise unpicklable_error(pickles[0], "is a pickle")
    if not is_converted(where):
        yield where
        return
    with tempfile.TemporaryDirectory(prefix="fastwidth-deepspeed-") as scratch:
        out = Path(scratch) / where.name
        out.mkdir()
        for tree_file in sorted(where.glob("*.json")):
            if rank is None or read_by(tree_file.name, rank):
                torch.save(read_file(tree_file), out / f"{tree_file.stem}.pt")
        yield out
