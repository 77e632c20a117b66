"""A trained model back from its run directory: the latest checkpoint, one member, in eval mode.

    model = load_model(run_dir, "w64_s0")      # fastwidth.load_model; interop/hf exports it

Here in trainer/ (beside the engines' checkpoint format it reads) so that both fastwidth.api and
interop/ reach it from above.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from fastwidth.errors import CheckpointError
from fastwidth.run.paths import RunDir


def _latest(run_dir: Path) -> Path:
    from fastwidth.run.checkpoint import latest_checkpoint
    found = latest_checkpoint(RunDir(run_dir).checkpoints) if RunDir(run_dir).checkpoints.is_dir() else None
    if found is None:
        raise CheckpointError(f"{run_dir} holds no checkpoint (train.out_dir of a finished or stopped run?)")
    return found


def member_state(checkpoint: Path, name: str | None, trust_checkpoint: bool = False) -> tuple[str, dict, dict]:
    """(member name, full fp32 state dict, checkpoint meta) of one member; the only member when
    `name` is None. Works for single-process and sharded (ddp, fsdp2, deepspeed) checkpoints; one
    holding files that need unpickling only with `trust_checkpoint` (refuse_unpicklable)."""
    from fastwidth.trainer.engine_checkpoint import member_tensors
    from fastwidth.run.checkpoint import read_checkpoint
    meta = read_checkpoint(checkpoint, trust=trust_checkpoint)
    names = [e["name"] for e in meta["members"]]
    if name is None and len(names) == 1:
        name = names[0]
    if name not in names:
        raise CheckpointError(f"checkpoint {checkpoint} has no model {name} (it holds {', '.join(names)}); "
                              f"name one with member=")
    return name, member_tensors(checkpoint, meta, name), meta


def model_io(cfg, run_dir: Path, state: dict) -> SimpleNamespace:
    """What building the model needs to know about the data, from the run itself (the data need
    not be present): classes and vocabulary from the readout, input shape from probe.safetensors."""
    from fastwidth.data import TEXT_SOURCES
    from fastwidth.models import KIND_OF_ARCH
    kind = KIND_OF_ARCH[cfg.model.arch] or ("tokens" if cfg.data.source in (*TEXT_SOURCES, "shards") else "classes")
    # tied: embed.weight only; model.arch hf: transformers' lm_head
    key = next((k for k in ("readout.weight", "lm_head.weight", "embed.weight") if k in state), None)
    outputs = int(state[key].shape[0]) if key else None  # a user's model (model.arch python) builds without io
    in_shape = None
    if kind == "classes":
        probe = RunDir(run_dir).probe
        if probe.is_file():
            from safetensors import safe_open
            with safe_open(str(probe), "pt") as f:
                in_shape = tuple(f.get_slice("x").get_shape()[1:])
        else:  # an MLP's first layer says its flat input size
            first = next(k for k in state if k.endswith("weight"))
            in_shape = (int(state[first].shape[1]),)
    return SimpleNamespace(kind=kind, vocab_size=outputs if kind == "tokens" else None, seq_len=cfg.data.seq_len,
                           in_shape=in_shape, num_classes=outputs if kind == "classes" else None)


def load_model(run_dir: str | Path, member: str | None = None, device="cpu", trust_checkpoint: bool = False):
    """The trained model `member` (e.g. "w64_s0"; may be omitted when the run has one) from the
    latest checkpoint of `run_dir`, in eval mode on `device`. Its forward gives logits; its µP
    table is `model.mup_table`. A checkpoint holding files that need unpickling (one written by
    an earlier version) is refused unless `trust_checkpoint`: unpickling can run code."""
    import torch
    from fastwidth.config import from_dict, read_yaml
    from fastwidth.models import build_model
    from fastwidth.run.members import MemberSpec
    from fastwidth.trainer.sweep import for_member
    run_dir = Path(run_dir).expanduser()
    if not RunDir(run_dir).config.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    name, state, meta = member_state(_latest(run_dir), member, trust_checkpoint)
    cfg = from_dict(read_yaml(RunDir(run_dir).config))
    width = int(next(e["width"] for e in meta["members"] if e["name"] == name))
    wcfg = for_member(cfg, width, None, MemberSpec.parse(name).depth)  # a depth sweep's member: its model.depth
    model, table = build_model(wcfg, model_io(wcfg, run_dir, state), device="cpu", seed=0)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    model.mup_table, model.config = table, wcfg
    return model.to(device).eval()
