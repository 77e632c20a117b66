"""`fastwidth export RUN -o OUT [--format safetensors|hf] [--member NAME]`.

Everything checkable is checked before anything is written: the run and its checkpoint, the
member, the layout (hf), and where OUT goes.
"""
from __future__ import annotations

from pathlib import Path

from fastwidth.errors import UserError
from fastwidth.run import RunDir


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


def export(run: str | Path, out: str | Path, fmt: str = "safetensors", member: str | None = None,
           trust_checkpoint: bool = False) -> tuple[Path, list[str]]:
    """Write the export; returns (what was written, the members in it)."""
    run, out = Path(run).expanduser(), Path(out).expanduser()
    if not run.exists():
        raise UserError(f"export: {run} does not exist")
    _check_output(out, fmt)
    if fmt == "safetensors":
        from fastwidth.trainer.engine_checkpoint import export_checkpoint
        return out, export_checkpoint(run, out, member=member, trust_checkpoint=trust_checkpoint)
    if fmt != "hf":
        raise UserError(f"export --format {fmt}: valid formats are safetensors, hf")
    if not member:
        raise UserError("export --format hf writes one model: name it with --member (e.g. --member w64_s0)")
    from fastwidth.interop.hf import export_hf
    run_dir = _run_dir_of(run)
    return export_hf(run_dir, member, out, trust_checkpoint), [member]
