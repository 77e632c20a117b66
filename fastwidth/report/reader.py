"""Read a run directory through its contract only (docs/design.md §5): config.yaml, metrics.jsonl,
signatures/. Works on any run directory, finished or still being written.

    run = load_run("runs/demo-20250101-000000")
    run.rows("consistency", ref="live")          # rows of one kind, filtered on equal keys
    run.series("eval", "probe_loss")              # {width: [(tokens, mean over seeds)]}
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fastwidth.errors import UserError
from fastwidth.stats.signature import list_signatures, load_signature


@dataclass
class Run:
    path: Path
    config: dict
    all_rows: list[dict]
    signatures: dict[str, dict[int, Path]] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.config.get("param", {}).get("kind", "?")

    @property
    def label(self) -> str:
        name = self.path.name
        return name if self.kind in name else f"{name} ({self.kind})"

    @property
    def ref_width(self) -> int:
        sweep = self.config.get("sweep", {})
        return int(sweep.get("reference_width") or max(self.widths or [0]))

    @property
    def widths(self) -> list[int]:
        ws = self.config.get("sweep", {}).get("widths") or sorted({r["width"] for r in self.all_rows
                                                                      if r.get("kind") == "eval"})
        return sorted(int(w) for w in ws)

    def rows(self, kind: str, **match) -> list[dict]:
        return [r for r in self.all_rows if r.get("kind") == kind and all(r.get(k) == v for k, v in match.items())]

    def series(self, kind: str, key: str, **match) -> dict[int, list[tuple[int, float]]]:
        """{width: [(tokens, mean over seeds of row[key])]} sorted by tokens; None values skipped."""
        acc: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in self.rows(kind, **match):
            v = get(r, key)
            if v is not None and math.isfinite(v):
                acc[r["width"]][r["tokens"]].append(v)
        return {w: sorted((t, sum(v) / len(v)) for t, v in by_t.items()) for w, by_t in sorted(acc.items())}

    def last_step(self, kind: str) -> int | None:
        steps = [r["step"] for r in self.rows(kind)]
        return max(steps) if steps else None

    def signature(self, name: str, step: int) -> tuple[dict, dict] | None:
        p = self.signatures.get(name, {}).get(step)
        return load_signature(p) if p else None


def get(row: dict, key: str):
    """row[key] with dotted keys reaching into nested dicts ("cka.layer0")."""
    node = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def load_run(path: str | Path) -> Run:
    p = Path(path)
    metrics = p / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{p} is not a run directory (no metrics.jsonl)")
    rows = []
    lines = metrics.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a run still writing may leave a partial last line
                continue
            raise UserError(f"{metrics}: line {i + 1} is not JSON") from None
    cfg_file = p / "config.yaml"
    config = (yaml.safe_load(cfg_file.read_text()) or {}) if cfg_file.is_file() else {}
    return Run(p, config, rows, list_signatures(p))


def late_mean(points: list[tuple[int, float]], frac: float = 0.25) -> float:
    """Mean of the values whose tokens lie in the last `frac` of the series (at least the last one)."""
    if not points:
        return math.nan
    t_max = points[-1][0]
    tail = [v for t, v in points if t >= (1 - frac) * t_max] or [points[-1][1]]
    return sum(tail) / len(tail)
