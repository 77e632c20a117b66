"""metrics.jsonl: one JSON object a line; every row has kind, step, tokens, width, seed."""
from __future__ import annotations

import json
import math
from pathlib import Path

REQUIRED = ("kind", "step", "tokens", "width", "seed")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them readable instead of invalid
    return v


class MetricsWriter:
    """Appends rows and flushes each one, so a crash loses at most the row being written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "a")

    def write(self, row: dict) -> None:
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"metrics row lacks {missing}: {row}")
        self._f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def truncate_after(path: Path, member_steps: dict[tuple[int, int], int]) -> None:
    """Drop rows written after the checkpoint a resume starts from.

    member_steps maps (width, seed) to that model's checkpointed step; rows of no model (or of
    a model not listed) are cut at the smallest step.
    """
    from fastwidth.train.checkpoint import atomic_write_text
    if not Path(path).is_file():
        return
    floor = min(member_steps.values())
    kept = [json.dumps(r) for r in read_metrics(path)
            if r.get("step", 0) <= member_steps.get((r.get("width"), r.get("seed")), floor)]
    atomic_write_text(Path(path), "".join(line + "\n" for line in kept))
