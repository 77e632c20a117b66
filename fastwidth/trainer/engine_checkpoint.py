"""Checkpoints seen from outside a run: `check_resumable` refuses, before any engine is built, a
resume DeepSpeed cannot load; `export_checkpoint` turns any checkpoint (the single-process format
or the engines' sharded layout, parallel/checkpoints.py) into one safetensors file and
`member_tensors` gives one member's full weights, with no process group.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from fastwidth.errors import CheckpointError
from fastwidth.parallel.checkpoints import LEGACY_DCP, dcp_model_tensors, is_dcp, member_dir
from fastwidth.parallel.zero import check_zero_shards
from fastwidth.param.scaling import scales_layer_input
from fastwidth.run import checkpoint as ckpt
from fastwidth.run.paths import RunDir, latest_pointer


def check_resumable(cfg, world_size: int) -> None:
    """Refuse, from the latest checkpoint's meta.json and before any engine or model is built, a
    resume that DeepSpeed cannot load: another ZeRO stage, or ZeRO-1/2 shards on another rank
    count (ZeRO-3 reshards through the universal checkpoint: load_universal). (The engine
    checks the same again once the checkpoint is verified: check_checkpoint.) Read-only: the
    `latest` pointer and one JSON file."""
    if not cfg.train.resume or cfg.dist.backend != "deepspeed":
        return
    found = ckpt.read_latest_pointer(RunDir(cfg.train.out_dir).checkpoints)
    meta_file = found / ckpt.META if found is not None else None
    if meta_file is None or not meta_file.is_file():
        return                                   # check_run_dir reports a missing checkpoint
    try:
        info = json.loads(meta_file.read_text()).get("engine") or {}
    except (OSError, ValueError):
        return                                   # read_checkpoint reports a corrupt one
    if info.get("backend") == "deepspeed":
        check_zero_shards(info, world_size, cfg.dist.zero_stage, meta_file.parent)


# --------------------------------------------------------------------------- export

def member_tensors(path: Path, meta: dict, name: str) -> dict[str, torch.Tensor]:
    """Member `name`'s full (unsharded) model state from checkpoint `path` (meta: its
    ckpt.read_checkpoint) in any format, without a process group."""
    if meta.get("engine") is None:
        return dict(meta["tensors"][f"model.{name}.safetensors"])
    where = member_dir(path, name)
    if (where / LEGACY_DCP).is_file():  # the previous version's DCP files: read only when trusted
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        with tempfile.TemporaryDirectory() as d:
            dcp_to_torch_save(str(where), os.path.join(d, "full.pt"))
            return dict(torch.load(os.path.join(d, "full.pt"), weights_only=True)["model"])
    if is_dcp(where):  # torch.distributed.checkpoint (fsdp2, and ddp members of a mixed run)
        return dcp_model_tensors(where)
    from fastwidth.parallel.zero import import_deepspeed
    from fastwidth.parallel.zero_files import readable
    import_deepspeed(torch.cuda.is_available())
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    # DeepSpeed's files rebuilt from safetensors + JSON; pickles (an earlier version's) are here
    # only when trusted: read_checkpoint, which made `meta`, refuses them otherwise
    with readable(where, trust=True) as src:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(src.parent), tag=src.name)
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}


def export_checkpoint(path: Path, out: Path, member: str | None = None, trust_checkpoint: bool = False,
                      fold_mults: bool = False) -> list[str]:
    """Write one safetensors file with the full (unsharded) fp32 weights of a checkpoint.

    One member: plain parameter names; several: '<member>/<name>'. The µP tables ride along in
    the file's metadata (JSON). Returns the members written. A checkpoint holding files that
    need unpickling is refused unless `trust_checkpoint` (run.checkpoint.refuse_unpicklable).
    `fold_mults` (a user's model, whose multipliers are hooks): each linear weight's forward
    multiplier is folded into it (W(αx) + b = (αW)x + b), so the file loads into the plain family
    with the trained logits; metadata "forward_mults" says "folded" (with "folded" = the factors)
    or "not folded" (fastwidth's own layers carry them: fastwidth.load_model).
    """
    from safetensors.torch import save_file
    path = Path(path)
    if latest_pointer(path).is_file() or RunDir(path).checkpoints.is_dir():
        root = RunDir(path).checkpoints if RunDir(path).checkpoints.is_dir() else path
        found = ckpt.latest_checkpoint(root)
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint")
        path = found
    meta = ckpt.read_checkpoint(path, trust=trust_checkpoint)
    names = [e["name"] for e in meta["members"]]
    if member is not None and member not in names:
        raise CheckpointError(f"checkpoint {path} has no model {member} (it holds {', '.join(names)})")
    chosen = [member] if member else names
    tensors, tables = {}, {n: meta.get("mup_tables", {}).get(n) for n in chosen}
    folded = {n: foldable(tables[n]) for n in chosen} if fold_mults else {}
    for name in chosen:
        for k, v in member_tensors(path, meta, name).items():
            v = v.detach().float() * folded.get(name, {}).get(k, 1.0)
            tensors[k if len(chosen) == 1 else f"{name}/{k}"] = v.contiguous()
    save_file(tensors, str(out), metadata={"format": "fastwidth-export-1", "step": str(meta["step"]),
                                           "members": json.dumps(chosen), "mup_tables": json.dumps(tables),
                                           "forward_mults": "folded" if fold_mults else "not folded",
                                           "folded": json.dumps(folded)})
    return chosen


def foldable(rows: list[dict] | None) -> dict[str, float]:
    """{weight name: forward multiplier} of the rows whose multiplier scales a linear layer's input
    (param.scaling.scales_layer_input, the rule UserModel's hooks follow), to fold into the weight.
    A branch multiplier (the depth kinds) scales a block's output, which no single weight carries:
    refused."""
    rows = rows or []
    if any(r.get("branch_mult", 1.0) != 1.0 for r in rows):
        raise CheckpointError("this run's residual-branch multipliers (param.kind depth_mup / completep / umup) "
                              "cannot be folded into one weight: load it with fastwidth.load_model instead")
    return {r["name"]: float(r["forward_mult"]) for r in rows
            if scales_layer_input(r["name"], r["init"], r["shape"]) and r["forward_mult"] != 1.0}
