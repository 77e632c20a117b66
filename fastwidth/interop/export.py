"""`fastwidth export RUN -o OUT [--format safetensors|hf] [--member NAME]`.

Everything checkable is checked before anything is written: the run and its checkpoint, the
member, the layout (hf), and where OUT goes: an existing OUT only with `force`, never a run
directory's own files (run/outputs.py). OUT is written beside itself and renamed into place, so a
failed export leaves nothing half-written.
"""
from __future__ import annotations

from pathlib import Path

from fastwidth.errors import UserError
from fastwidth.run import RunDir
from fastwidth.run.outputs import check_target, replacing


def _check_output(out: Path, fmt: str) -> None:
    if fmt == "safetensors":
        if out.is_dir():
            raise UserError(f"export -o {out} is a directory; give the .safetensors file to write")
        if not out.parent.is_dir():
            raise UserError(f"export -o {out}: directory {out.parent} does not exist (create it, or write elsewhere)")
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"export --format hf -o {out} is a file; give the directory to write the checkpoint into")
    parent = out.parent
    if not out.exists() and not parent.is_dir():
        raise UserError(f"export -o {out}: directory {parent} does not exist (create it, or write elsewhere)")


def _run_dir_of(path: Path) -> Path:
    """The run directory of RUN, RUN/checkpoints or RUN/checkpoints/step_*."""
    for cand in (path, path.parent, path.parent.parent):
        if RunDir(cand).config.is_file() and RunDir(cand).checkpoints.is_dir():
            return cand
    raise UserError(f"{path} is not a run directory (no config.yaml and checkpoints/)")


def _users_model(run: Path) -> bool:
    """Whether RUN trained a model fastwidth did not write (model.arch python / hf), whose forward
    multipliers are hooks that a plain load_state_dict would not bring back: its export folds them."""
    from fastwidth.config import read_yaml
    try:
        arch = (read_yaml(RunDir(_run_dir_of(run)).config).get("model") or {}).get("arch")
    except UserError:  # a bare checkpoint directory: no config to read
        return False
    return arch in ("python", "hf")


def export(run: str | Path, out: str | Path, fmt: str = "safetensors", member: str | None = None,
           force: bool = False, trust_checkpoint: bool = False) -> tuple[Path, list[str]]:
    """Write the export; returns (what was written, the members in it). `force`: replace an existing OUT;
    `trust_checkpoint`: read checkpoint files that would need unpickling (an earlier version's)."""
    run, out = Path(run).expanduser(), Path(out).expanduser()
    if not run.exists():
        raise UserError(f"export: {run} does not exist")
    _check_output(out, fmt)
    if fmt not in ("safetensors", "hf"):
        raise UserError(f"export --format {fmt}: valid formats are safetensors, hf")
    check_target(out, flag="export -o" if fmt == "safetensors" else "export --format hf -o", force=force,
                 kind="file" if fmt == "safetensors" else "dir")
    if fmt == "safetensors":
        from fastwidth.trainer.engine_checkpoint import export_checkpoint
        with replacing(out, kind="file") as tmp:
            names = export_checkpoint(run, tmp, member=member, trust_checkpoint=trust_checkpoint,
                                      fold_mults=_users_model(run))
        return out, names
    if not member:
        raise UserError("export --format hf writes one model: name it with --member (e.g. --member w64_s0)")
    from fastwidth.interop.hf import export_hf
    run_dir = _run_dir_of(run)
    with replacing(out, kind="dir") as tmp:
        export_hf(run_dir, member, tmp, trust_checkpoint)
    return out, [member]


def export_note(out: str | Path, fmt: str) -> str:
    """The export's printed line's tail: for a user's model, which forward multipliers the
    safetensors file has folded into its weights (its metadata says the same)."""
    if fmt != "safetensors":
        return ""
    import json

    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("forward_mults") != "folded":
        return ""
    folded = {k: v for per in json.loads(meta.get("folded", "{}")).values() for k, v in per.items()}
    said = ", ".join(f"{k} x{v:g}" for k, v in sorted(folded.items())) or "none to fold"
    return (f"; forward multipliers folded into the weights ({said}): load_state_dict into the family "
            f"at its width gives the trained logits, no hooks needed")
