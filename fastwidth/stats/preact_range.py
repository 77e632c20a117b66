"""Per-layer preactivation histogram ranges, fixed once from the reference width's first evaluation.

    ranges = reference_ranges(ref_models, probe_x, eval_batch, device, q=0.001, margin=1.0)
    save_ranges(run_dir, ranges)                  # run_dir/preact_ranges.json: every width, any
    ranges = load_ranges(run_dir)                 # resume and any later comparison use these bins
    lo, hi, bins = with_overflow(*ranges[layer], 64)

A fixed ±8 range put 20-40% of the µP Fashion-MNIST mass into the edge bins, so W1 compared the
clipped body. Here a layer's range is the [q, 1 - q] quantile interval of its preactivations on
the probe split, pooled over the reference width's seeds at the first evaluation, widened by
`margin` times its span on each side (preactivations grow in training). The accumulators get
two overflow bins, one bin-width wide, outside that range, so everything outside is counted
apart from the body: their share is the out-of-range fraction logged at every eval.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

RANGES_FILE = "preact_ranges.json"
MAX_VALUES = 1 << 20   # values per layer kept for the quantiles (a fixed stride over the probe)


@torch.no_grad()
def reference_ranges(models: list[torch.nn.Module], probe_x: torch.Tensor, eval_batch: int, device,
                     q: float = 0.001, margin: float = 1.0) -> dict[str, list[float]]:
    """{layer: [lo, hi]} from the preact_points outputs of `models` on the probe inputs."""
    values: dict[str, list[torch.Tensor]] = {}
    for model in models:
        points = model.preact_points()
        hooks = [mod.register_forward_hook(
            lambda _m, _i, out, k=k: values.setdefault(k, []).append(
                (out[0] if isinstance(out, (tuple, list)) else out).detach().float().reshape(-1).cpu()))
            for k, mod in points.items()]
        was = model.training
        model.eval()
        try:
            for s in range(0, probe_x.shape[0], eval_batch):
                model(probe_x[s:s + eval_batch].to(device))
        finally:
            for h in hooks:
                h.remove()
            model.train(was)
    ranges = {}
    for layer, parts in values.items():
        v = torch.cat(parts)
        v = v[:: max(1, v.numel() // MAX_VALUES)].double()
        lo, hi = (float(x) for x in torch.quantile(v, torch.tensor([q, 1 - q], dtype=torch.float64)))
        span = hi - lo if hi > lo else max(abs(hi), 1.0)
        ranges[layer] = [lo - margin * span, hi + margin * span]
    return ranges


def with_overflow(lo: float, hi: float, bins: int) -> tuple[float, float, int]:
    """Accumulator range and bins: `bins` equal bins on [lo, hi] plus one overflow bin each side."""
    w = (hi - lo) / bins
    return lo - w, hi + w, bins + 2


def out_of_range_fraction(hist) -> float | None:
    """Share of the mass in the two overflow bins (with_overflow's layout); None for an empty histogram."""
    h = np.asarray(hist, dtype=np.float64)
    total = h.sum()
    return float((h[0] + h[-1]) / total) if total > 0 else None


def save_ranges(run_dir: Path, ranges: dict[str, list[float]]) -> Path:
    path = Path(run_dir) / RANGES_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ranges, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def load_ranges(run_dir: Path) -> dict[str, list[float]] | None:
    path = Path(run_dir) / RANGES_FILE
    return json.loads(path.read_text()) if path.is_file() else None
