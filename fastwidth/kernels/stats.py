"""Streaming-statistics kernels: one-pass moments + fixed-range histogram, and Gram accumulation.

moments_histogram reads a tensor once and returns count, sum, sum x^2, x^3, x^4, min, max and a
histogram of `bins` equal bins on [lo, hi); values outside the range land in the edge bins (so
the bins always add up to the count) and NaNs are left out of the histogram, min and max (they
still turn the sums NaN, which is the signal the statistics code wants). Partial sums are fp32 per lane inside
the kernel and are added up in fp64 by the launcher.

gram returns acc + F F^T in fp32 for features F (P, N): the feature kernel of P probe examples.
No autograd: statistics are read, never differentiated.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastwidth.errors import UserError
from fastwidth.kernels import dispatch, native
from fastwidth.kernels._triton import HAS_TRITON, AotConfig, interpreting, jit, next_pow2, tl, triton
from fastwidth.kernels.amp import autocast_off


class Moments(NamedTuple):
    count: int
    sum: Tensor    # fp64 scalars on x's device
    sumsq: Tensor
    sum3: Tensor
    sum4: Tensor
    min: Tensor
    max: Tensor
    hist: Tensor   # (bins,) int64


# ---------------------------------------------------------------- torch reference


def _bin_index(xf: Tensor, lo: float, hi: float, bins: int) -> Tensor:
    # fp32 (x - lo) * (bins / (hi - lo)), floored and clamped: the kernel does the same ops.
    scale = torch.tensor(bins / (hi - lo), dtype=torch.float32)
    return ((xf - lo) * scale).floor().clamp(0, bins - 1).long()


def moments_histogram_ref(x: Tensor, lo: float, hi: float, bins: int, shift: float = 0.0,
                          hist_stride: int = 1) -> Moments:
    xf = x.detach().reshape(-1).float()
    xd = xf.double()
    keep = ~torch.isnan(xf)
    xs = xf[::hist_stride]
    hist = torch.bincount(_bin_index(xs[~torch.isnan(xs)], lo, hi, bins), minlength=bins)
    finite = xd[keep] if bool(keep.any()) else xd.new_full((1,), float("nan"))
    d = xd - shift
    return Moments(xf.numel(), d.sum(), (d ** 2).sum(), (d ** 3).sum(), (d ** 4).sum(),
                   finite.min(), finite.max(), hist)


def gram_ref(feats: Tensor, acc: Optional[Tensor] = None) -> Tensor:
    f = feats.detach().float()
    with autocast_off(f):  # statistics are fp32 whatever the training precision
        g = f @ f.t()
    return g if acc is None else acc + g


# ---------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @jit
    def _moments_kernel(x_ptr, part_ptr, hist_ptr, n, per_prog, lo, bin_scale, BINS,
                        NB: tl.constexpr, BLOCK: tl.constexpr):
        # Program p reads x[p * per_prog : (p + 1) * per_prog] in BLOCK-sized steps.
        pid = tl.program_id(0)
        start = tl.cast(pid, tl.int64) * per_prog
        s1 = tl.zeros((BLOCK,), tl.float32)
        s2 = tl.zeros((BLOCK,), tl.float32)
        s3 = tl.zeros((BLOCK,), tl.float32)
        s4 = tl.zeros((BLOCK,), tl.float32)
        mn = tl.full((BLOCK,), float("inf"), tl.float32)
        mx = tl.full((BLOCK,), float("-inf"), tl.float32)
        hist = tl.zeros((NB,), tl.int32)
        for i in range(0, per_prog, BLOCK):
            offs = start + i + tl.arange(0, BLOCK)
            mask = (offs < n) & (i + tl.arange(0, BLOCK) < per_prog)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x2 = x * x
            s1 += x
            s2 += x2
            s3 += x2 * x
            s4 += x2 * x2
            mn = tl.minimum(mn, tl.where(mask, x, float("inf")))
            mx = tl.maximum(mx, tl.where(mask, x, float("-inf")))
            idx = tl.floor((x - lo) * bin_scale)
            idx = tl.minimum(tl.maximum(idx, 0.0), BINS - 1.0).to(tl.int32)
            # masked lanes and NaNs go to the spare bin BINS, which is never written out
            idx = tl.where(mask & (x == x), idx, BINS)
            hist += tl.histogram(idx, NB)
        base = part_ptr + pid * 6
        tl.store(base + 0, tl.sum(s1, axis=0))
        tl.store(base + 1, tl.sum(s2, axis=0))
        tl.store(base + 2, tl.sum(s3, axis=0))
        tl.store(base + 3, tl.sum(s4, axis=0))
        tl.store(base + 4, tl.min(mn, axis=0))
        tl.store(base + 5, tl.max(mx, axis=0))
        bins = tl.arange(0, NB)
        tl.atomic_add(hist_ptr + bins, hist, mask=bins < BINS)

    @jit
    def _gram_kernel(f_ptr, acc_ptr, out_ptr, P, N, stride_f, HAS_ACC: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_i = tl.program_id(0)
        pid_j = tl.program_id(1)
        oi = pid_i * BLOCK_P + tl.arange(0, BLOCK_P)
        oj = pid_j * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = tl.arange(0, BLOCK_K)
        g = tl.zeros((BLOCK_P, BLOCK_P), tl.float32)
        for k0 in range(0, N, BLOCK_K):
            kk = k0 + ok
            a = tl.load(f_ptr + oi[:, None] * stride_f + kk[None, :], mask=(oi[:, None] < P) & (kk[None, :] < N),
                        other=0.0).to(tl.float32)
            bt = tl.load(f_ptr + oj[None, :] * stride_f + kk[:, None], mask=(oj[None, :] < P) & (kk[:, None] < N),
                         other=0.0).to(tl.float32)
            if IEEE:
                g += tl.dot(a, bt, input_precision="ieee")
            else:
                g += tl.dot(a, bt)
        omask = (oi[:, None] < P) & (oj[None, :] < P)
        out = oi[:, None] * P + oj[None, :]
        if HAS_ACC:
            g += tl.load(acc_ptr + out, mask=omask, other=0.0)
        tl.store(out_ptr + out, g, mask=omask)


# ---------------------------------------------------------------- launchers

# moments: 4096 elements a step at 8 warps on a GPU, ~8 programs an SM so the final fp64 sum is
# over about a thousand partials; 1024 and 4 programs in the interpreter (each step is numpy).
MOMENTS_BLOCK = 4096
MOMENTS_WARPS = 8
INTERP_MOMENTS_BLOCK = 1024
DEFAULT_BINS = 64  # moments_histogram's; the preactivation histograms' 64 + 2 overflow bins take the same lanes
# gram: 64x64 output tiles, 32-wide K steps at 4 warps on a GPU (P is a probe set of a few hundred
# to a few thousand); 32x32 in the interpreter. (BLOCK_P, BLOCK_K).
GRAM_TILE = (64, 32)
GRAM_WARPS = 4
INTERP_GRAM_TILE = (32, 32)


def hist_lanes(bins: int) -> int:
    """tl.histogram's width NB for `bins` bins: a power of two with a spare bin for masked lanes and NaNs."""
    return next_pow2(bins + 1)


def _aot_kernels() -> list[AotConfig]:
    """What `python -m fastwidth.kernels.aot` compiles: both kernels at their GPU configs in both
    dtypes, the histogram at the default bins, the Gram kernel accumulating (IEEE dots for fp32,
    as the launcher sets them)."""
    out = []
    for dtype in ("bf16", "fp32"):
        out.append(AotConfig(_moments_kernel, dtype, dict(NB=hist_lanes(DEFAULT_BINS), BLOCK=MOMENTS_BLOCK),
                             MOMENTS_WARPS, ptr_types={"part_ptr": "fp32", "hist_ptr": "i32"},
                             scalar_types={"lo": "fp32", "bin_scale": "fp32"}))
        bp, bk = GRAM_TILE
        out.append(AotConfig(_gram_kernel, dtype, dict(HAS_ACC=True, IEEE=dtype == "fp32", BLOCK_P=bp, BLOCK_K=bk),
                             GRAM_WARPS, ptr_types={"acc_ptr": "fp32", "out_ptr": "fp32"}))
    return out


AOT_KERNELS = _aot_kernels() if HAS_TRITON else []


def _moments_launch(x: Tensor, lo: float, hi: float, bins: int) -> tuple[Tensor, Tensor]:
    xf = x.detach().reshape(-1).contiguous()
    n = xf.numel()
    interp = interpreting(x)
    block = INTERP_MOMENTS_BLOCK if interp else MOMENTS_BLOCK
    progs = max(1, min(4 if interp else 8 * torch.cuda.get_device_properties(x.device).multi_processor_count,
                       triton.cdiv(n, block)))
    per_prog = triton.cdiv(triton.cdiv(n, progs), block) * block
    progs = max(1, triton.cdiv(n, per_prog))
    part = torch.empty(progs, 6, device=x.device, dtype=torch.float32)
    hist = torch.zeros(bins, device=x.device, dtype=torch.int32)
    _moments_kernel[(progs,)](xf, part, hist, n, per_prog, float(lo), float(bins / (hi - lo)), bins,
                              NB=hist_lanes(bins), BLOCK=block, num_warps=MOMENTS_WARPS)
    p = part.double()
    # (sum, sumsq, sum3, sum4, min, max) in fp64
    return torch.cat([p[:, :4].sum(0), p[:, 4].min()[None], p[:, 5].max()[None]]), hist.long()


def _gram_launch(feats: Tensor, acc: Optional[Tensor]) -> Tensor:
    f = feats.detach()
    f = f if f.stride(-1) == 1 else f.contiguous()
    P, N = f.shape
    out = torch.empty(P, P, device=f.device, dtype=torch.float32)
    bp, bk = INTERP_GRAM_TILE if interpreting(f) else GRAM_TILE
    grid = (triton.cdiv(P, bp), triton.cdiv(P, bp))
    _gram_kernel[grid](f, acc.contiguous() if acc is not None else out, out, P, N, f.stride(0),
                       HAS_ACC=acc is not None, IEEE=f.dtype == torch.float32, BLOCK_P=bp, BLOCK_K=bk,
                       num_warps=GRAM_WARPS)
    return out


# ---------------------------------------------------------------- registered ops


@torch.library.custom_op("fastwidth::moments_histogram", mutates_args=())
def _moments_op(x: Tensor, lo: float, hi: float, bins: int) -> tuple[Tensor, Tensor]:
    return _moments_launch(x, lo, hi, bins)


@_moments_op.register_fake
def _(x, lo, hi, bins):
    return x.new_empty(6, dtype=torch.float64), x.new_empty(bins, dtype=torch.int64)


@torch.library.custom_op("fastwidth::gram", mutates_args=())
def _gram_op(feats: Tensor, acc: Optional[Tensor]) -> Tensor:
    return _gram_launch(feats, acc)


@_gram_op.register_fake
def _(feats, acc):
    return feats.new_empty(feats.shape[0], feats.shape[0], dtype=torch.float32)


def _register_native() -> None:
    @torch.library.register_fake("fastwidth_native::moments_histogram")
    def _(x, lo, hi, bins, shift=0.0, hist_stride=1):
        return x.new_empty(6, dtype=torch.float64), x.new_empty(bins, dtype=torch.int64)


native.register_python_side(_register_native)


# ---------------------------------------------------------------- functional


def moments_histogram(x: Tensor, lo: float, hi: float, bins: int = DEFAULT_BINS, backend: str | None = None, *,
                      shift: float = 0.0, hist_stride: int = 1) -> Moments:
    """One pass over x (any shape): Moments(count, sum, sumsq, sum3, sum4, min, max, hist).

    Native and torch only (Triton takes the defaults): the power sums are of x - shift (a shift
    near the mean keeps the central moments exact when |mean| >> std), and the histogram counts
    every hist_stride-th element. The native op bins in fp64 (numpy's bins), the others in fp32."""
    if not hi > lo or bins < 1:
        raise UserError(f"moments_histogram: need hi > lo and bins >= 1, got lo={lo}, hi={hi}, bins={bins}")
    if x.numel() == 0:
        raise ValueError("moments_histogram: empty tensor")
    name = dispatch.resolve(backend, x)
    if name == "native":
        s, hist = native.load().moments_histogram(x.detach(), float(lo), float(hi), int(bins), float(shift),
                                                  int(hist_stride))
    elif name != "triton":
        return moments_histogram_ref(x, lo, hi, bins, shift, hist_stride)
    elif shift or hist_stride != 1:
        raise ValueError("moments_histogram: the Triton kernel takes shift=0 and hist_stride=1 only")
    else:
        s, hist = _moments_op(x, float(lo), float(hi), int(bins))
    return Moments(x.numel(), s[0], s[1], s[2], s[3], s[4], s[5], hist)


def gram(feats: Tensor, acc: Optional[Tensor] = None, backend: str | None = None) -> Tensor:
    """acc + feats @ feats.T in fp32. Inputs: feats (P, N); acc (P, P) fp32 or None. Outputs: (P, P)."""
    if feats.dim() != 2 or (acc is not None and acc.shape != (feats.shape[0], feats.shape[0])):
        raise ValueError(f"gram: feats {tuple(feats.shape)} must be (P, N) and acc (P, P)")
    if dispatch.resolve(backend, feats) != "triton":
        return gram_ref(feats, acc)
    return _gram_op(feats, None if acc is None else acc.float())
