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


class StridedSample:
    """Every `stride`-th value of the concatenation of everything `add`ed (flattened, in order),
    kept on the host as the values arrive: what torch.cat(all).reshape(-1)[::stride] would give,
    without holding all."""

    def __init__(self, stride: int):
        self.stride, self.offset, self.parts = stride, 0, []

    def add(self, t: torch.Tensor) -> None:
        flat = t.detach().reshape(-1)
        # copy=True: on the CPU a float32 view would keep the whole output's storage alive
        self.parts.append(flat[(-self.offset) % self.stride::self.stride].to("cpu", torch.float32, copy=True))
        self.offset += flat.numel()

    def values(self) -> torch.Tensor:
        return torch.cat(self.parts)


def quantile_ranges(values: dict[str, torch.Tensor], q: float, margin: float) -> dict[str, list[float]]:
    """{layer: [lo, hi]}: the [q, 1 - q] quantiles of each layer's values widened by margin x span."""
    ranges = {}
    for layer, v in values.items():
        lo, hi = (float(x) for x in torch.quantile(v.double(), torch.tensor([q, 1 - q], dtype=torch.float64)))
        span = hi - lo if hi > lo else max(abs(hi), 1.0)
        ranges[layer] = [lo - margin * span, hi + margin * span]
    return ranges


@torch.no_grad()
def reference_ranges(models: list[torch.nn.Module], probe_x: torch.Tensor, eval_batch: int, device,
                     q: float = 0.001, margin: float = 1.0) -> dict[str, list[float]]:
    """{layer: [lo, hi]} from the preact_points outputs of `models` (one architecture: the reference
    width's seeds) on the probe inputs, forwards of eval_batch examples.

    The quantiles are those of a fixed stride over the values of every model and probe example
    (about MAX_VALUES to 2 MAX_VALUES of them per layer); each hook keeps only its stride of the
    block output as it comes (StridedSample), never the output itself, so host memory holds the
    sample, not the probe's preactivations (which at width 16384 are gigabytes per layer).
    """
    n = probe_x.shape[0]
    samples: dict[str, StridedSample] = {}
    per_example: dict[str, int] = {}
    rows = {"n": 0}

    def hook(key):
        def run(_m, _i, out):
            out = out[0] if isinstance(out, (tuple, list)) else out
            if key not in samples:  # the stride over all values: models x examples x values per example
                per_example[key] = out.numel() // rows["n"]
                samples[key] = StridedSample(max(1, len(models) * n * per_example[key] // MAX_VALUES))
            if out.numel() != per_example[key] * rows["n"]:
                raise RuntimeError(f"reference_ranges: layer {key} gives {out.numel() // rows['n']} values per "
                                   f"example, an earlier model {per_example[key]}: the models must share an architecture")
            samples[key].add(out)
        return run

    for model in models:
        hooks = [mod.register_forward_hook(hook(k)) for k, mod in model.preact_points().items()]
        was = model.training
        model.eval()
        try:
            for s in range(0, n, eval_batch):
                x = probe_x[s:s + eval_batch]
                rows["n"] = x.shape[0]
                model(x.to(device))
        finally:
            for h in hooks:
                h.remove()
            model.train(was)
    return quantile_ranges({k: smp.values() for k, smp in samples.items()}, q, margin)


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
