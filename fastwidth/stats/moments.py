"""Streaming preactivation moments and fixed-range histograms, accumulated without host syncs.

    acc = PreactAccumulator(bins=64, lo=-8.0, hi=8.0)
    for x in batches:          # inside the training step, on the model's device
        acc.update(x)          # a few device ops, no .item()
    summary = acc.result()     # one sync at eval time: count, mean, var, skew, kurt, min, max, hist

Each `update` reduces one tensor to a small fp32 row (count, mean, M2, M3, M4, min, max) plus its
histogram, stored on the device. `result` moves the rows to the host once and merges them with
Chan/Pébay's pairwise formulas in float64, so a long stretch of batches keeps full precision
(batch-centered sums, never raw power sums, which cancel catastrophically when |mean| >> std).
Values outside [lo, hi] are counted in the edge bins, so the histogram sums to `count` (to the
number of sampled elements with hist_stride > 1: histograms are normalized before any use).
With `asinh=(c, s)` the histogram bins u = asinh((x - c) / s) on [lo, hi] instead of x (the
asinh units of stats/preact_range.py); the moments are always those of x.
"""
from __future__ import annotations

import math

import numpy as np
import torch

MOMENT_NAMES = ("count", "mean", "var", "skew", "kurt", "min", "max")


# --------------------------------------------------------------------------- reference

def moments_ref(x: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Offline moments of all elements in float64 (population variance, excess kurtosis)."""
    a = np.asarray(torch.as_tensor(x).detach().double().cpu()).reshape(-1)
    mean = a.mean()
    d = a - mean
    var = (d ** 2).mean()
    skew = (d ** 3).mean() / var ** 1.5 if var > 0 else 0.0
    kurt = (d ** 4).mean() / var ** 2 - 3.0 if var > 0 else 0.0
    return {"count": float(a.size), "mean": float(mean), "var": float(var), "skew": float(skew),
            "kurt": float(kurt), "min": float(a.min()), "max": float(a.max())}


def histogram_ref(x, bins: int, lo: float, hi: float, asinh: tuple[float, float] | None = None) -> np.ndarray:
    """Offline histogram (float64) with out-of-range values clipped into the edge bins; with
    asinh=(c, s), of asinh((x - c) / s)."""
    a = np.asarray(torch.as_tensor(x).detach().double().cpu()).reshape(-1)
    if asinh is not None:
        a = np.arcsinh((a - asinh[0]) / asinh[1])
    return np.histogram(np.clip(a, lo, hi), bins=bins, range=(lo, hi))[0].astype(np.float64)


# --------------------------------------------------------------------------- one batch

_WORKSPACE: dict = {}

# The torch path's working set is two fp32 buffers of one chunk: 2 x 4 x 2^22 B = 32 MiB, where
# unchunked it was two of the whole preactivation (2 GiB for a width-16384 GPT layer at 16k
# tokens). At 2^22 elements a chunk's ~10 ops cost ~40 µs of launch overhead against ~8 ms of
# arithmetic on one CPU core, so chunking costs nothing measurable.
CHUNK = 1 << 22


def _workspace(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two reusable flat fp32 buffers of x's size on x's device (grown, never shrunk).

    Hooks run one at a time, so one pair per device serves every layer and model.
    """
    key = (x.device.type, x.device.index)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.shape[1] < x.numel():
        buf = _WORKSPACE[key] = torch.empty(2, x.numel(), dtype=torch.float32, device=x.device)
    return buf[0, :x.numel()], buf[1, :x.numel()]


def binned_values(xs: torch.Tensor, asinh: tuple[float, float] | None) -> torch.Tensor:
    """What the histogram bins: xs itself, or asinh((xs - c) / s) (fp32, one temporary of xs's size)."""
    if asinh is None:
        return xs
    c, s = asinh
    return torch.asinh((xs - c) / s)


def histogram_torch(x: torch.Tensor, bins: int, lo: float, hi: float, hist_stride: int = 1,
                    asinh: tuple[float, float] | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """The (bins,) fp32 histogram of every hist_stride-th element of flat x (binned_values), clamped
    into the edge bins, in chunks of x (temporaries of chunk / hist_stride elements)."""
    x = x.reshape(-1)
    step = max(hist_stride, chunk - chunk % hist_stride)
    hist = torch.zeros(bins, dtype=torch.float32, device=x.device)
    for start in range(0, x.numel(), step):
        xs = binned_values(x[start:start + step][::hist_stride].float(), asinh)
        hist += torch.histc(xs.clamp(lo, hi), bins=bins, min=lo, max=hi)
    return hist


def batch_moments_torch(x: torch.Tensor, bins: int, lo: float, hi: float,
                        hist_stride: int = 1, chunk: int = CHUNK,
                        asinh: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, M2, M3, M4, min, max) as one fp32 row and the (bins,) histogram of a flat tensor.

    Every op stays on x's device; histc with an explicit range does not read the tensor's
    min/max back to the host, so this is sync-free on CUDA. Moments use every element; the
    histogram uses every `hist_stride`-th one: on one CPU core histc costs ~17 ns/element
    against ~1 ns for a sum (2M-element preactivation: 35 ms vs 1 ms), and a fixed stride of a
    large batch estimates the shape as well. var_mean is avoided for the same reason (35 ms).

    The central sums run over pieces of at most `chunk` elements (a multiple of hist_stride, so
    the strided histogram picks the same elements), each about the whole tensor's mean: the
    workspace is two chunks, not two copies of x. One piece is the unchunked computation.
    """
    x = x.reshape(-1)
    n = x.numel()
    mean = x.sum(dtype=torch.float32) / n
    step = max(hist_stride, chunk - chunk % hist_stride)
    sums, lows, highs, hists = [], [], [], []
    for start in range(0, n, step):
        xc = x[start:start + step].float()
        d, d2 = _workspace(xc)
        torch.sub(xc, mean, out=d)
        torch.mul(d, d, out=d2)
        # dots read two vectors and allocate nothing; fresh (d2 * d).sum() temporaries cost ~5 ms
        # each in page faults at 2M elements on CPU, more than the arithmetic
        sums.append(torch.stack([torch.dot(d, d), torch.dot(d2, d), torch.dot(d2, d2)]))
        mn, mx = torch.aminmax(xc)
        lows.append(mn)
        highs.append(mx)
        xs = binned_values(xc[::hist_stride] if hist_stride > 1 else xc, asinh)
        # histc drops out-of-range values; clamping first puts them in the edge bins
        hists.append(torch.histc(xs.clamp(lo, hi), bins=bins, min=lo, max=hi))
    if len(sums) == 1:
        (m2, m3, m4), mn, mx, hist = sums[0], lows[0], highs[0], hists[0]
    else:
        m2, m3, m4 = torch.stack(sums).sum(0)
        mn, mx, hist = torch.stack(lows).min(), torch.stack(highs).max(), torch.stack(hists).sum(0)
    return torch.stack([mean, m2, m3, m4, mn, mx]), hist


def batch_moments_fused(x: torch.Tensor, bins: int, lo: float, hi: float, backend: str = "triton",
                        hist_stride: int = 1, asinh: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same row from kernels/stats.py's one-pass kernel, Triton or native (raw fp64 power
    sums, one read of x). In asinh units the kernel's histogram (linear in x) is not used: the
    histogram is histogram_torch's of every hist_stride-th element under both backends (on a GPU
    one more read of x, against a statistics cost measured at +0.2% of a step).

    Centering raw sums loses digits when |mean| >> std (relative error ~ eps64 * (mean/std)^4 in
    M4); preactivations have |mean| of the order of their std, so fp64 keeps every digit we use.
    """
    from fastwidth.kernels.stats import moments_histogram

    # native: power sums about the first element (reading one value costs nothing on the CPU),
    # so the cancellation goes with (x0 - mean)/std instead of mean/std: a few std at most, not
    # 1e4; Triton on a GPU: about 0 (no host sync; see above)
    first = float(x.reshape(-1)[0]) if backend == "native" else 0.0
    shift = first if math.isfinite(first) else 0.0
    # asinh units: the kernel's linear histogram goes unused; the native op then bins into one
    # bin (no wasted work); the Triton kernel keeps the bin count it is compiled and checked for
    # (one bin was run in the interpreter only, never on a GPU)
    nb = 1 if asinh and backend == "native" else bins
    m = moments_histogram(x, lo, hi, nb, backend=backend, shift=shift,
                          hist_stride=hist_stride if backend == "native" else 1)
    n = float(m.count)
    # moments about the mean as the row stores it (fp32), as the torch path's are: merge() takes
    # them as central about that value; e = that mean - shift, the sums expanded binomially
    c = (shift + m.sum / n).float().double()
    e = c - shift
    k1, k2, k3, k4 = m.sum, m.sumsq, m.sum3, m.sum4
    m2 = k2 - 2 * e * k1 + n * e ** 2
    m3 = k3 - 3 * e * k2 + 3 * e ** 2 * k1 - n * e ** 3
    m4 = k4 - 4 * e * k3 + 6 * e ** 2 * k2 - 4 * e ** 3 * k1 + n * e ** 4
    row = torch.stack([c, m2, m3, m4, m.min.double(), m.max.double()]).float()
    if asinh is not None:
        return row, histogram_torch(x, bins, lo, hi, hist_stride, asinh)
    return row, m.hist.float()


def batch_moments(x: torch.Tensor, bins: int, lo: float, hi: float, hist_stride: int = 1,
                  asinh: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused one-pass kernel where the kernels backend picks Triton (CUDA) or the native op
    (CPU), else the torch path.

    The Triton kernel reads x once for everything, so it histograms every element (no stride);
    the native op keeps the stride, so CPU histograms are those of the torch path.
    """
    from fastwidth.kernels import dispatch

    name = dispatch.resolve(None, x)
    if name in ("triton", "native"):
        return batch_moments_fused(x, bins, lo, hi, backend=name, hist_stride=hist_stride, asinh=asinh)
    return batch_moments_torch(x, bins, lo, hi, hist_stride, asinh=asinh)


# --------------------------------------------------------------------------- merging

def merge(a: tuple, b: tuple) -> tuple:
    """Merge two (n, mean, M2, M3, M4) summaries exactly (Pébay 2008, eq. 2.1-2.3), float64."""
    na, ma, m2a, m3a, m4a = a
    nb, mb, m2b, m3b, m4b = b
    if na == 0:
        return b
    if nb == 0:
        return a
    n = na + nb
    d = mb - ma
    mean = ma + d * nb / n
    m2 = m2a + m2b + d * d * na * nb / n
    m3 = (m3a + m3b + d ** 3 * na * nb * (na - nb) / n ** 2
          + 3.0 * d * (na * m2b - nb * m2a) / n)
    m4 = (m4a + m4b + d ** 4 * na * nb * (na * na - na * nb + nb * nb) / n ** 3
          + 6.0 * d * d * (na * na * m2b + nb * nb * m2a) / n ** 2
          + 4.0 * d * (na * m3b - nb * m3a) / n)
    return n, mean, m2, m3, m4


def finalize(n: float, mean: float, m2: float, m3: float, m4: float, mn: float, mx: float) -> dict[str, float]:
    var = m2 / n if n else 0.0
    skew = (m3 / n) / var ** 1.5 if var > 0 else 0.0
    kurt = (m4 / n) / var ** 2 - 3.0 if var > 0 else 0.0
    return {"count": float(n), "mean": float(mean), "var": float(var), "skew": float(skew),
            "kurt": float(kurt), "min": float(mn), "max": float(mx)}


class PreactAccumulator:
    """Moments and histogram of every tensor passed to `update` since the last `reset`; with
    asinh=(c, s) the histogram's [lo, hi] is in u = asinh((x - c) / s)."""

    def __init__(self, bins: int = 64, lo: float = -8.0, hi: float = 8.0, hist_stride: int = 1,
                 asinh: tuple[float, float] | None = None):
        if not hi > lo or bins < 1:
            raise ValueError(f"histogram range [{lo}, {hi}] with {bins} bins is empty")
        if asinh is not None and not (math.isfinite(asinh[0]) and asinh[1] > 0):
            raise ValueError(f"asinh histogram units need a finite centre and a scale > 0, got {asinh}")
        self.bins, self.lo, self.hi, self.hist_stride = bins, float(lo), float(hi), int(hist_stride)
        self.asinh = None if asinh is None else (float(asinh[0]), float(asinh[1]))
        self.reset()

    def reset(self) -> None:
        self._counts: list[int] = []            # numel per batch: known on the host, no sync
        self._rows: list[torch.Tensor] = []     # (6,) fp32 per batch, on the device
        self._hists: list[torch.Tensor] = []    # (bins,) per batch, on the device
        self._carry: tuple | None = None        # merged host summary of earlier flushes / a resume

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        row, hist = batch_moments(x.detach(), self.bins, self.lo, self.hi, self.hist_stride, self.asinh)
        self._counts.append(x.numel())
        self._rows.append(row)
        self._hists.append(hist)
        if len(self._rows) >= 256:  # bound device memory on long eval intervals; one sync per 256 steps
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        rows = torch.stack(self._rows).double().cpu().numpy()  # the one host transfer
        hist = torch.stack(self._hists).double().sum(0).cpu().numpy()
        n0, mean, m2, m3, m4, mn, mx, h = self._carry or (0, 0.0, 0.0, 0.0, 0.0, math.inf, -math.inf,
                                                         np.zeros(self.bins))
        acc = (n0, mean, m2, m3, m4)
        for n, r in zip(self._counts, rows):
            acc = merge(acc, (float(n), r[0], r[1], r[2], r[3]))
        self._carry = (*acc, min(mn, rows[:, 4].min()), max(mx, rows[:, 5].max()), h + hist)
        self._counts, self._rows, self._hists = [], [], []

    def result(self) -> dict:
        """{count, mean, var, skew, kurt, min, max, hist (np.float64 array), lo, hi}; syncs once."""
        self._flush()
        if self._carry is None:
            out = finalize(0, 0.0, 0.0, 0.0, 0.0, math.nan, math.nan)
            out["hist"] = np.zeros(self.bins)
        else:
            n, mean, m2, m3, m4, mn, mx, h = self._carry
            out = finalize(n, mean, m2, m3, m4, mn, mx)
            out["hist"] = np.asarray(h, dtype=np.float64)
        out["lo"], out["hi"], out["asinh"] = self.lo, self.hi, self.asinh
        return out

    def state_dict(self) -> dict:
        self._flush()
        head = {"bins": self.bins, "lo": self.lo, "hi": self.hi, "stride": self.hist_stride,
                "asinh": None if self.asinh is None else list(self.asinh)}
        if self._carry is None:
            return {**head, "carry": None}
        *scalars, h = self._carry
        return {**head, "carry": [float(s) for s in scalars] + [list(map(float, h))]}

    def set_summary(self, summary: tuple) -> None:
        """Replace what was accumulated by `summary` = (n, mean, M2, M3, M4, min, max, hist): a merge
        of other accumulators' summaries on the same bins (stats/ranks.py, the ranks' summaries)."""
        self.reset()
        self._carry = tuple(summary)

    def load_state_dict(self, d: dict) -> None:
        self.__init__(d["bins"], d["lo"], d["hi"], d.get("stride", 1), d.get("asinh"))
        if d.get("carry") is not None:
            *scalars, h = d["carry"]
            self._carry = (*scalars, np.asarray(h, dtype=np.float64))
