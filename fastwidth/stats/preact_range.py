"""Per-layer preactivation histogram bins, fixed once from the reference width's first evaluation.

    ranges = reference_ranges(ref_models, probe_x, eval_batch, device, units="asinh", reach=1e3)
    save_ranges(run_dir, ranges)                  # run_dir/preact_ranges.json: every width, any
    ranges = load_ranges(run_dir)                 # resume and any later comparison use these bins
    b = Bins.of(ranges[layer])                    # lo, hi, bins = b.accumulator(64); b.centers(66)

Why asinh units. A histogram accumulates over the training batches between two evaluations, so
its bins must be fixed before that interval starts, and identical for every width so W1 compares
like with like. The preactivations' scale does not stay put: on the µP Fashion-MNIST MLP
(configs/fmnist_mlp.yaml) the third layer's std grows from 0.49 at init to 8.9 by step 78 and
its max to 72 (147 init stds). Linear bins fixed at init put up to 24%, 58% and 76% of the three
layers' mass in the overflow bins;
bins re-set at each evaluation from the reference width's latest moments cannot know the 18x
growth of the first interval either. Bins uniform in u = asinh((x - c) / s), with c, s the mean
and std of the reference width's probe preactivations at the first evaluation, are linear within
about one init std of the centre (the resolution the init distribution needs) and logarithmic
outside (a constant relative resolution, e^du - 1 per bin), reaching `reach` init stds from c:
one set of bins covers every evaluation. Nothing depends on a schedule, so a resume (this file),
the sharded reduction (summed counts on identical bins), sequential sweeps and a stored
reference run (its file is copied) share bins by construction. The scale travels with every
signature (meta "hist_ranges") and with this file, so a reader maps bins back to raw units
(Bins.edges). `units="raw"` keeps the former linear bins: the [q, 1 - q] quantile interval of the
same sample widened by `margin` times its span on each side.

Both layouts add two overflow bins, one bin wide, outside the body; their share of the mass is
the out-of-range fraction logged at every eval (0 at every eval of that run in asinh units, its
largest value at u = 5.75 of 7.60; 24-76% per layer with the quantile bins).
A stored range in the old format, a list [lo, hi], reads as raw units.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastwidth.run.paths import RunDir
from fastwidth.run.writes import writing

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


@dataclass(frozen=True)
class Bins:
    """One layer's histogram body: [lo, hi] in raw units, or in u = asinh((x - center) / scale)."""
    units: str = "raw"
    lo: float = -1.0
    hi: float = 1.0
    center: float = 0.0
    scale: float = 1.0

    @classmethod
    def of(cls, stored) -> "Bins":
        """From preact_ranges.json / signature meta: {units, lo, hi, center, scale} or a raw [lo, hi]."""
        if isinstance(stored, (list, tuple)):
            return cls("raw", float(stored[0]), float(stored[1]))
        return cls(**stored)

    def to_json(self) -> dict:
        return {"units": self.units, "lo": self.lo, "hi": self.hi, "center": self.center, "scale": self.scale}

    @property
    def asinh(self) -> tuple[float, float] | None:
        """(center, scale) of the transform the accumulators apply before binning; None in raw units."""
        return (self.center, self.scale) if self.units == "asinh" else None

    def accumulator(self, bins: int) -> tuple[float, float, int]:
        """(lo, hi, bins) of the accumulator in binned units: the body plus the two overflow bins."""
        return with_overflow(self.lo, self.hi, bins)

    def raw(self, u: np.ndarray) -> np.ndarray:
        """Binned units -> raw preactivation units."""
        u = np.asarray(u, dtype=np.float64)
        return self.center + self.scale * np.sinh(u) if self.units == "asinh" else u

    def edges(self, n: int) -> np.ndarray:
        """Raw-unit edges of a stored histogram of n bins (n - 2 body bins and the overflow pair)."""
        lo, hi, _ = self.accumulator(n - 2)
        return self.raw(np.linspace(lo, hi, n + 1))

    def centers(self, n: int) -> np.ndarray:
        """Raw-unit points at which W1 places each bin's mass (the bin's middle in binned units)."""
        lo, hi, _ = self.accumulator(n - 2)
        w = (hi - lo) / n
        return self.raw(lo + w * (np.arange(n) + 0.5))


def asinh_ranges(values: dict[str, torch.Tensor], reach: float) -> dict[str, dict]:
    """{layer: Bins json}: u = asinh((x - mean) / std) of each layer's values, body |u| <= asinh(reach).

    A layer with no spread (constant at init) takes scale max(|mean|, 1), as the raw ranges do."""
    ranges = {}
    for layer, v in values.items():
        v = v.double()
        c, s = float(v.mean()), float(v.std(correction=0))
        s = s if s > 0 and math.isfinite(s) else max(abs(c), 1.0)
        u = math.asinh(reach)
        ranges[layer] = Bins("asinh", -u, u, c, s).to_json()
    return ranges


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
                     q: float = 0.001, margin: float = 1.0, units: str = "raw", reach: float = 1e3) -> dict:
    """{layer: bins} from the preact_points outputs of `models` (one architecture: the reference
    width's seeds) on the probe inputs, forwards of eval_batch examples: asinh_ranges (units
    "asinh") or quantile_ranges (units "raw", a [lo, hi] list per layer).

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
    values = {k: smp.values() for k, smp in samples.items()}
    return asinh_ranges(values, reach) if units == "asinh" else quantile_ranges(values, q, margin)


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
    path = RunDir(run_dir).ranges
    tmp = path.with_suffix(".tmp")
    with writing(path, tmp=tmp):
        tmp.write_text(json.dumps(ranges, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)
    return path


def load_ranges(run_dir: Path) -> dict[str, list[float]] | None:
    path = RunDir(run_dir).ranges
    return json.loads(path.read_text()) if path.is_file() else None
