"""Read a run directory through its contract only (docs/design.md §5): config.yaml, metrics.jsonl,
signatures/. Works on any run directory, finished or still being written.

    run = load_run("runs/demo-20250101-000000")
    run.rows("consistency", ref="live")          # rows of one kind, filtered on equal keys
    run.series("eval", "probe_loss")              # {width: [(tokens, mean over seeds)]}

Two views of the rows. `sweep_rows` holds every row. `all_rows`, which the per-width figures
read, leaves out every row of a member that was stopped for divergence (its "diverged" row stays,
and `stopped_note` says so), and in a learning-rate sweep (sweep.lrs) keeps one learning rate:
the one with the lowest final loss at the reference width (`chosen_lr`), so seed means never mix
learning rates; the rows of a refinement pass (`pass: "refine"`, sweep.lr_refine) are left out of
it (each refined learning rate was trained at one width). Figures of the whole sweep (report/transfer.py) read `sweep_rows`.
In a depth sweep (sweep.depths) `all_rows` keeps the reference depth's rows and those across width
(no `"axis": "depth"`), so the width figures read one depth; `depth_rows` holds the same view at
every depth, which report/depth.py reads.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fastwidth.errors import UserError
from fastwidth.run import MemberSpec, RunDir
from fastwidth.run.metrics import parse_row
from fastwidth.stats.signature import load_signature

# the fitted quantities of a fit row, each with its `<key>_ci` (summary.json's fits, report/depth.py)
FIT_KEYS = ("rmse_slope", "variance_slope", "bias_slope", "rmse2_a", "bias_beta_sq", "bias_exponent",
            "variance_slope_centered", "variance_slope_logp")


@dataclass
class Run:
    path: Path
    config: dict
    all_rows: list[dict]
    signatures: dict[str, dict[int, Path]] = field(default_factory=dict)
    sweep_rows: list[dict] = field(default_factory=list)
    chosen_lr: float | None = None
    partial: str | None = None  # one line: what of the run is missing or cut (partial_note)
    probe: str | None = None    # the probe split's hash (probe_identity), where the report asked
    depth_rows: list[dict] = field(default_factory=list)  # all_rows at every depth (module docstring)

    @property
    def diverged(self) -> list[dict]:
        return [r for r in self.sweep_rows if r.get("kind") == "diverged"]

    @property
    def lrs(self) -> list[float]:
        return sorted(float(v) for v in self.config.get("sweep", {}).get("lrs") or [])

    @property
    def kind(self) -> str:
        return self.config.get("param", {}).get("kind", "?")

    @property
    def label(self) -> str:
        name = self.path.name
        name = name if self.kind in name else f"{name} ({self.kind})"
        return name if self.chosen_lr is None else f"{name} lr={self.chosen_lr:.3g}"

    @property
    def ref_width(self) -> int:
        sweep = self.config.get("sweep", {})
        return int(sweep.get("reference_width") or max(self.widths or [0]))

    @property
    def depths(self) -> list[int]:
        """sweep.depths, sorted; [] outside a depth sweep."""
        return sorted(int(d) for d in self.config.get("sweep", {}).get("depths") or [])

    @property
    def ref_depth(self) -> int | None:
        """The depth the others are compared with (sweep.reference_depth, 0 = the deepest); None outside a depth sweep."""
        return int(self.config.get("sweep", {}).get("reference_depth") or max(self.depths)) if self.depths else None

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
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                acc[r["width"]][r["tokens"]].append(v)
        return {w: sorted((t, sum(v) / len(v)) for t, v in by_t.items()) for w, by_t in sorted(acc.items())}

    def last_step(self, kind: str) -> int | None:
        steps = [r["step"] for r in self.rows(kind)]
        return max(steps) if steps else None

    def member_name(self, width: int, seed: int) -> str:
        """The name of the member (width, seed) of the rows the report keeps (at chosen_lr in an LR sweep)."""
        return MemberSpec(width, self.chosen_lr, seed).name

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
    metrics = RunDir(p).metrics
    if not metrics.is_file():
        raise UserError(f"{p} is not a run directory (no metrics.jsonl)")
    rows, cut = [], 0
    lines = metrics.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(parse_row(line, metrics, i + 1))  # null, NaN and legacy "nan" -> None
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a run still writing, or killed, may leave a partial last line
                cut = len(line.encode())
                continue
            raise UserError(f"{metrics}: line {i + 1} is not JSON") from None
    cfg_file = RunDir(p).config
    config = (yaml.safe_load(cfg_file.read_text()) or {}) if cfg_file.is_file() else {}
    run = Run(p, config, rows, RunDir(p).list_signatures(), sweep_rows=rows)
    run.depth_rows = _view(run)
    run.all_rows = at_reference_depth(run, run.depth_rows)
    run.partial = partial_note(run, cut, cfg_file.is_file())
    return run


def probe_identity(run: Run) -> str | None:
    """The hash of the probe split the run's signatures were taken on (stats/signature.py
    probe_hash): of RUN/probe.safetensors, else as its signatures record it; None when the run
    keeps neither (nothing to compare)."""
    probe = RunDir(run.path).probe
    if probe.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from fastwidth.stats.signature import probe_hash
        try:
            return probe_hash(load_file(str(probe)))
        except (SafetensorError, OSError, KeyError) as e:
            raise UserError(f"{probe}: not a readable probe split ({e}); a run writes it as safetensors "
                            f"with tensors x and y") from None
    first = next((p for steps in run.signatures.values() for p in steps.values()), None)
    return load_signature(first)[1].get("probe_hash") if first is not None else None


def probe_labels(run: Run):
    """The probe split's targets, flattened to one per point (classifiers: the class of each
    example; token streams: the target token of each position), read from RUN/probe.safetensors
    (never unpickled); None when the run keeps no probe file. The points of a signature's feature
    kernels are these at stats.signature.strided_index(len, kernel_points)."""
    probe = RunDir(run.path).probe
    if not probe.is_file():
        return None
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(probe), framework="pt") as f:
            return f.get_tensor("y").reshape(-1)
    except (SafetensorError, OSError, KeyError) as e:
        raise UserError(f"{probe}: not a readable probe split ({e}); a run writes it as safetensors "
                        f"with tensors x and y") from None


def partial_note(run: Run, cut_bytes: int = 0, has_config: bool = True) -> str | None:
    """What a run directory lacks that a finished run has, in one line; None for a finished run."""
    missing = []
    if cut_bytes:
        missing.append(f"metrics.jsonl ends in a cut line ({cut_bytes} bytes, left out)")
    if not has_config:
        missing.append("no config.yaml (settings come from the rows)")
    if not any(r.get("kind") == "run" for r in run.sweep_rows):
        steps = [r["step"] for r in run.sweep_rows if r.get("kind") == "train" and isinstance(r.get("step"), int)]
        total = run.config.get("train", {}).get("steps")
        of = f" of train.steps={total}" if total is not None else ""
        stop = next((r for r in reversed(run.sweep_rows) if r.get("kind") == "preempted"), None)
        if stop is not None:
            missing.append(f"stopped by {stop.get('signal', 'a signal')} at step {stop['step']}{of} "
                           f"(train.resume=auto continues it)")
        else:
            missing.append(f"unfinished: train rows up to step {max(steps)}{of}" if steps else "no train rows yet")
    if run.config.get("stats", {}).get("enabled", True) and not any(r.get("kind") == "eval" for r in run.sweep_rows):
        missing.append("no evaluations yet (no probe-loss or consistency rows)")
    return "; ".join(missing) or None


def member_key(row: dict, lr_sweep: bool) -> tuple:
    """Which member a row belongs to: (width, seed), in a learning-rate sweep base_lr, and in a
    depth sweep (rows carrying depth) depth."""
    key = (row.get("width"), row.get("seed"), row.get("base_lr")) if lr_sweep else (row.get("width"), row.get("seed"))
    return key + (row["depth"],) if "depth" in row else key


def at_reference_depth(run: Run, rows: list[dict]) -> list[dict]:
    """The rows the width figures read in a depth sweep: the reference depth's, none across depth
    (`"axis": "depth"`); rows without a depth (run rows) stay. Outside a depth sweep: `rows`."""
    ref = run.ref_depth
    if ref is None:
        return rows
    return [r for r in rows if r.get("axis") != "depth" and r.get("depth", ref) == ref]


def end_loss(rows: list[dict], frac: float = 0.1) -> float:
    """A member's loss at the end of its rows: the last probe loss, else the mean train loss of the
    last `frac` of its steps (online batches are fresh data, so that is a held-out estimate too)."""
    evals = [r for r in rows if r.get("kind") == "eval" and isinstance(r.get("probe_loss"), (int, float))]
    if evals:
        return float(max(evals, key=lambda r: r["step"])["probe_loss"])
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float))]
    if not train:
        return math.nan
    last = max(t for t, _ in train)
    tail = [v for t, v in train if t >= (1 - frac) * last]
    return sum(tail) / len(tail)


def _view(run: Run) -> list[dict]:
    lr_sweep = bool(run.lrs)
    stopped = {member_key(r, lr_sweep) for r in run.diverged}
    rows = [r for r in run.sweep_rows if r.get("pass") != "refine"]  # sweep.lr_refine: one width per lr
    rows = [r for r in rows if r.get("kind") == "diverged" or r.get("seed", -1) < 0
            or member_key(r, lr_sweep) not in stopped]
    if not lr_sweep:
        return rows
    ref = run.ref_width
    by_lr = defaultdict(lambda: defaultdict(list))
    for r in at_reference_depth(run, rows):
        if r.get("width") == ref and r.get("base_lr") is not None and r.get("seed", -1) >= 0:
            by_lr[r["base_lr"]][r["seed"]].append(r)
    ends = {lr: sum(end_loss(v) for v in seeds.values()) / len(seeds) for lr, seeds in by_lr.items()}
    ends = {lr: v for lr, v in ends.items() if math.isfinite(v)}
    if not ends:
        return rows
    run.chosen_lr = min(ends, key=ends.get)
    return [r for r in rows if r.get("base_lr", run.chosen_lr) == run.chosen_lr]


def progress_word(run: Run) -> str:
    """What a run's "tokens" count: training targets of a language model, examples of the rest."""
    return "tokens" if run.config.get("model", {}).get("arch", "gpt") == "gpt" else "examples"


def stopped_note(run: Run) -> list[str]:
    """Markdown lines naming the members the report leaves out because they diverged, and the
    statistics the run skipped ("skipped" rows: an engine that cannot compute one, a learning rate
    whose reference-width members all diverged)."""
    lines = []
    if run.diverged:
        names = [f"{r.get('name') or member_key(r, True)} (step {r['step']})" for r in run.diverged]
        more = f" and {len(names) - 8} more" if len(names) > 8 else ""
        lines += [f"{run.label}: {len(names)} member(s) diverged and were stopped; the figures and "
                  f"statistics leave them out: {', '.join(names[:8])}{more}.", ""]
    for r in run.sweep_rows:
        if r.get("kind") == "skipped":
            lr = f" (lr {r['base_lr']:g})" if isinstance(r.get("base_lr"), (int, float)) else ""
            lines += [f"{run.label}: {r.get('stat', 'a statistic')} skipped{lr}: {r.get('reason', '')}", ""]
    return lines


def late_mean(points: list[tuple[int, float]], frac: float = 0.25) -> float:
    """Mean of the values whose tokens lie in the last `frac` of the series (at least the last one)."""
    if not points:
        return math.nan
    t_max = points[-1][0]
    tail = [v for t, v in points if t >= (1 - frac) * t_max] or [points[-1][1]]
    return sum(tail) / len(tail)


def final_fit(run: Run) -> dict:
    """The last fit row's fitted numbers and their intervals (None where the loop had none)."""
    rows = last_rows(run, "fit")
    if not rows:
        return {}
    row = rows[0]
    out = {}
    for k in FIT_KEYS:
        out[k], out[f"{k}_ci"] = row.get(k), row.get(f"{k}_ci")
    out.update({k: row.get(k) for k in ("n_boot", "ci_level", "ci_expansion", "bias_exponent_reason", "step", "tokens")
                if k in row})
    return out


def last_rows(run: Run, kind: str, **match) -> list[dict]:
    step = max((r["step"] for r in run.rows(kind, **match)), default=None)
    return [] if step is None else run.rows(kind, step=step, **match)
