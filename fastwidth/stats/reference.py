"""stats.reference_run checked at start, before any model is built: the stored run must have
trained on the same stream (source, path, data.seed, tokenizer and vocabulary, probe) with the
same model family, and every signature the comparison will read must open. A mismatch compared
silently (another data.seed gave an RMSE of 0.124 where the same stream gives 0), and a corrupt
signature crashed the run at the evaluation that first read it, before any checkpoint.

    check_reference_run(cfg, stream)     # Trainer.__init__, after the stream, before the members

The Monitor's ReferenceRun (stats/monitor.py) then compares the probe and statistics settings
from the signatures' metadata and loads them by step.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from safetensors import safe_open

from fastwidth.errors import UserError
from fastwidth.run import MemberSpec, RunDir
from fastwidth.run.metrics import read_metrics
from fastwidth.stats.signature import ProbeSpec

# (config section, key) that must agree with the reference run's config.yaml
SAME_KEYS = (("model", "arch"), ("data", "source"), ("data", "seed"), ("data", "tokenizer"))
# the reference's "data" row (metrics.jsonl) against this stream's describe()
SAME_DATA = ("tokenizer_id", "vocab_size", "fingerprint")


def _fail(path, what: str, hint: str = "of the same model family on the same stream (data source, path, "
                                         "seed, tokenizer and probe)") -> UserError:
    return UserError(f"stats.reference_run {path} {what}; compare runs {hint}")


def read_reference_config(path: Path) -> dict:
    """The reference run's config.yaml as a mapping; UserError (one line) when it is not a run."""
    cfg_file = RunDir(path).config
    if not cfg_file.is_file():
        raise UserError(f"stats.reference_run {path} is not a run directory (no config.yaml)")
    try:
        saved = yaml.safe_load(cfg_file.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"stats.reference_run {path}: {cfg_file} cannot be read ({e})") from None
    if not isinstance(saved, dict):
        raise UserError(f"stats.reference_run {path}: {cfg_file} is not a config mapping")
    return saved


def _data_row(path: Path) -> dict | None:
    """The reference's first "data" row (the stream it trained on), None when it has none."""
    try:
        rows = read_metrics(RunDir(path).metrics)
    except (OSError, ValueError):
        return None
    return next((r for r in rows if isinstance(r, dict) and r.get("kind") == "data"), None)


def _same_path(a: str, b: str) -> bool:
    if not a or not b:
        return (a or "") == (b or "")
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _check_stream(path: Path, saved: dict, cfg, stream) -> None:
    for section, key in SAME_KEYS:
        theirs, ours = (saved.get(section) or {}).get(key), getattr(getattr(cfg, section), key)
        if theirs != ours:
            raise _fail(path, f"has {section}.{key}={theirs!r}, this run {ours!r}")
    row = _data_row(path)
    here = stream.describe()
    for key in SAME_DATA:
        if row is not None and key in row and key in here and row[key] != here[key]:
            raise _fail(path, f"trained on data with {key} {row[key]!r}, this run's data has {here[key]!r}")
    theirs_path = (saved.get("data") or {}).get("path", "")
    if not _same_path(theirs_path, cfg.data.path) and (row is None or row.get("fingerprint") != here["fingerprint"]):
        raise _fail(path, f"has data.path={theirs_path!r}, this run {cfg.data.path!r}")


def reference_signatures(path: Path, saved: dict) -> tuple[int, dict[str, dict[int, Path]]]:
    """(the reference width, {member: {step: signature file}} of its seeds at that width) of the
    reference run at `path` (saved: its config); UserError when it holds none."""
    sweep = saved.get("sweep") or {}
    width = int(sweep.get("reference_width") or max(sweep.get("widths") or [0]))
    sigs = {name: steps for name, steps in RunDir(path).list_signatures().items()
            if (spec := MemberSpec.parse(name)).width == width and spec.lr is None}
    if not sigs:
        raise UserError(f"stats.reference_run {path} holds no signatures at its reference width {width}")
    return width, sigs


def _reference_signature_files(path: Path, saved: dict) -> list[Path]:
    _, sigs = reference_signatures(path, saved)
    return [p for _, steps in sorted(sigs.items()) for _, p in sorted(steps.items())]


def check_reference_run(cfg, stream) -> None:
    """UserError (one line) unless cfg.stats.reference_run trained on `stream`'s data with the same
    model family and every signature of its reference width opens (naming the first that does not)."""
    path = Path(cfg.stats.reference_run)
    saved = read_reference_config(path)
    _check_stream(path, saved, cfg, stream)
    sc = cfg.stats
    want = ProbeSpec.build(stream.probe(), signature_points=sc.signature_points, kernel_points=sc.kernel_points,
                           sketch_dim=sc.sketch_dim, sketch_seed=sc.sketch_seed, eval_batch=sc.eval_batch).meta()
    for sig in _reference_signature_files(path, saved):
        try:  # the header only: safetensors refuses a file its header does not cover exactly (truncated)
            with safe_open(str(sig), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("json", "{}"))
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise UserError(f"stats.reference_run {path}: signature {sig} cannot be read "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'damaged'})") from None
        for key, ours in want.items():  # the probe and the signature's shape (the Monitor checks the bins)
            if key in meta and meta[key] != ours:
                raise _fail(path, f"has {key}={meta[key]!r} in {sig}, this run {ours!r}",
                            "with the same probe and stats settings")
