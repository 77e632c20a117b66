"""metrics.jsonl: one JSON object a line; every row has kind, step, tokens, width, seed.

JSON has no NaN or infinity: a non-finite number is written as null (at any depth of a row), and
every reader here maps null, and the strings "nan" / "inf" that older runs wrote, to None.
`json_safe` is the one cleaner of what goes into JSON (rows, the report's summary.json): tensors
and arrays become numbers, non-finite numbers null.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from fastwidth.errors import DataError
from fastwidth.run.writes import writing

REQUIRED = ("kind", "step", "tokens", "width", "seed")
REFINE = "refine"    # the "pass" of the rows of sweep.lr_refine's second pass (absent: the first)


NON_FINITE_STRINGS = {"nan", "-nan", "inf", "-inf", "infinity", "-infinity"}


def json_safe(v):
    """`v` ready for json.dumps(allow_nan=False): dicts, lists and tuples cleaned at every depth,
    tensors and numpy arrays turned into (lists of) numbers, every non-finite float into None."""
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if hasattr(v, "tolist"):  # torch tensors, numpy arrays and scalars (duck-typed: no torch import here)
        return json_safe(v.tolist())
    return v


def from_json(v):
    """A parsed row with the legacy non-finite strings ("nan", "inf") and NaN literals turned to None."""
    if isinstance(v, dict):
        return {k: from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [from_json(x) for x in v]
    if isinstance(v, str) and v.lower() in NON_FINITE_STRINGS:
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    """Appends rows and flushes each one, so a crash loses at most the row being written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with writing(self.path):
            self._f = open(self.path, "a")

    def write(self, row: dict) -> None:
        """Append `row`; a full disk raises an OSError naming metrics.jsonl (write() and flush()
        name no file), and the file is left ending with the last whole row."""
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"metrics row lacks {missing}: {row}")
        line = json.dumps(json_safe(row), allow_nan=False) + "\n"
        end = self._f.tell()
        try:
            with writing(self.path):
                self._f.write(line)
                self._f.flush()
        except OSError:
            self._drop_partial_row(end)
            raise

    def _drop_partial_row(self, end: int) -> None:
        """Cut what reached the file of a row that failed half-way (a reader would stop at it)."""
        try:
            self._f.close()
        except OSError:
            pass  # the buffered rest of the row cannot be flushed either: it is what we drop
        try:
            os.truncate(self.path, end)
        except OSError:
            pass

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def parse_row(line: str, path: Path, number: int) -> dict:
    """One line of metrics.jsonl as a row (non-finite values None); json.JSONDecodeError for a line
    that is not JSON (a cut last line is the caller's to forgive), a DataError naming the file and
    line for JSON that is not an object (an array, a number, a string)."""
    row = json.loads(line)
    if not isinstance(row, dict):
        raise DataError(f"{path}:{number}: a JSON {type(row).__name__}, not an object; every line of "
                        f"metrics.jsonl is one JSON object with kind, step, tokens, width, seed")
    return from_json(row)


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl. A cut last line (a run killed while writing it) is left out, as
    the report's reader does; any other line that is not a JSON object is a DataError naming the
    file and the line."""
    lines = Path(path).read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(parse_row(line, path, number))
        except json.JSONDecodeError as e:
            if number == len(lines):
                continue
            raise DataError(f"{path}:{number}: not JSON ({e.msg}); every line of metrics.jsonl is one "
                            f"JSON object") from None
    return rows


def truncate_after(path: Path, member_steps: dict[tuple, int], floors: dict | None = None) -> None:
    """Drop rows written after the checkpoint a resume starts from.

    member_steps maps (width, seed, base_lr) to that model's checkpointed step (base_lr None outside
    a learning-rate sweep; (width, seed, base_lr, depth) in a depth sweep); rows of no model (or of
    a model not listed) are cut at the smallest step,
    or at floors[row's "pass"] (sweep.lr_refine: a finished first pass keeps its rows while the
    refinement pass resumes from an earlier step).
    """
    from fastwidth.run.checkpoint import atomic_write_text  # lazily: torch only where rows are cut
    if not Path(path).is_file():
        return
    floor = min(member_steps.values())

    def limit(r: dict) -> int:
        key = (r.get("width"), r.get("seed"))
        cut = (floors or {}).get(r.get("pass"), floor)
        if r.get("depth") is not None:  # a depth sweep: its members are (..., depth)
            return member_steps.get((*key, r.get("base_lr"), r["depth"]), cut)
        return member_steps.get((*key, r.get("base_lr")), member_steps.get((*key, None), cut))

    kept = [json.dumps(json_safe(r)) for r in read_metrics(path) if r.get("step", 0) <= limit(r)]
    atomic_write_text(Path(path), "".join(line + "\n" for line in kept))
