"""RMSNorm and LayerNorm over the last dim, forward and backward, optionally fused with the
residual add (s = x + residual; y = norm(s)), returning per-row RMS of the norm input.

The per-row RMS, sqrt(mean(s^2)) in fp32 without eps, is what the coordinate statistics log;
the kernel has it for free. Statistics and the normalization are computed in fp32; y and s
are stored in the input dtype, and s is rounded to that dtype before it is normalized, as an
unfused `x + residual` would be, so both backends see the same residual stream.
Limits: the normalized dim N <= 32768 (wider rows than one block holds are read in chunks: CHUNK, BWD_CHUNK).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastwidth.errors import UserError
from fastwidth.kernels import dispatch, native
from fastwidth.kernels._triton import HAS_TRITON, AotConfig, interpreting, jit, next_pow2, tl, triton

MAX_N = 32768

# ---------------------------------------------------------------- torch reference


def norm_ref(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
             eps: float, is_rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, s, rms): y = norm(s) * weight + bias in x.dtype, s = x + residual (or x),
    rms = sqrt(mean(s^2)) per row in fp32 (no grad)."""
    s = x if residual is None else x + residual
    sf = s.to(torch.promote_types(s.dtype, torch.float32))  # fp32, or fp64 for an fp64 reference
    if is_rms:
        y = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            y = y * weight.to(sf.dtype)
        if bias is not None:
            y = y + bias.to(sf.dtype)
    else:
        w = None if weight is None else weight.to(sf.dtype)
        b = None if bias is None else bias.to(sf.dtype)
        y = F.layer_norm(sf, (s.shape[-1],), w, b, eps)
    with torch.no_grad():
        rms = sf.pow(2).mean(-1).sqrt().float()
    return y.to(x.dtype), s, rms


# ---------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @jit
    def _load_s(x_ptr, r_ptr, s_ptr, off, mask, HAS_RES: tl.constexpr, STORE: tl.constexpr):
        # the norm input in fp32: x, or x + residual rounded to the storage dtype first (the
        # unfused reference rounds it), stored to s_ptr when STORE
        x = tl.load(x_ptr + off, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(r_ptr + off, mask=mask, other=0.0)
            s = (x.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
            if STORE:
                tl.store(s_ptr + off, s, mask=mask)
            s = s.to(tl.float32)
        else:
            s = x.to(tl.float32)
        return s

    @jit
    def _norm_store(s, off, cols, mask, mean, rstd, w_ptr, b_ptr, y_ptr, IS_RMS: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr):
        if IS_RMS:
            y = s * rstd
        else:
            y = tl.where(mask, s - mean, 0.0) * rstd
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)

    @jit
    def _norm_fwd_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, s_ptr, mean_ptr, rstd_ptr, rms_ptr,
                         N, eps, IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                         HAS_B: tl.constexpr, CHUNKED: tl.constexpr, BLOCK_N: tl.constexpr):
        # One program a row. CHUNKED (rows wider than one block): two passes over BLOCK_N-column
        # chunks, the statistics first (LayerNorm's variance by Chan et al.'s pairwise update of
        # chunk means and M2, no E[s^2] - mean^2 cancellation), then y from a second read.
        row = tl.program_id(0).to(tl.int64)
        base = row * N
        cols = tl.arange(0, BLOCK_N)
        if CHUNKED:
            ss = 0.0
            mean = 0.0
            m2 = 0.0
            for c0 in range(0, N, BLOCK_N):
                mask = c0 + cols < N
                s = _load_s(x_ptr, r_ptr, s_ptr, base + c0 + cols, mask, HAS_RES, True)
                ss += tl.sum(s * s, axis=0)
                if not IS_RMS:
                    cnt = tl.minimum(N - c0, BLOCK_N).to(tl.float32)
                    mc = tl.sum(s, axis=0) / cnt
                    dc = tl.where(mask, s - mc, 0.0)
                    tot = c0 + cnt
                    delta = mc - mean
                    mean += delta * (cnt / tot)
                    m2 += tl.sum(dc * dc, axis=0) + delta * delta * (c0 * (cnt / tot))
            var = m2 / N
        else:
            mask = cols < N
            s = _load_s(x_ptr, r_ptr, s_ptr, base + cols, mask, HAS_RES, True)
            ss = tl.sum(s * s, axis=0)
            mean = 0.0
            var = 0.0
            if not IS_RMS:
                mean = tl.sum(s, axis=0) / N
                d = tl.where(mask, s - mean, 0.0)
                var = tl.sum(d * d, axis=0) / N
        ms = ss / N
        tl.store(rms_ptr + row, tl.sqrt(ms))
        if IS_RMS:
            mean = 0.0
            rstd = 1.0 / tl.sqrt(ms + eps)
        else:
            rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)
        if CHUNKED:
            for c0 in range(0, N, BLOCK_N):
                mask = c0 + cols < N
                s = _load_s(x_ptr, r_ptr, s_ptr, base + c0 + cols, mask, HAS_RES, False)
                _norm_store(s, base + c0 + cols, c0 + cols, mask, mean, rstd, w_ptr, b_ptr, y_ptr, IS_RMS, HAS_W,
                            HAS_B)
        else:
            _norm_store(s, base + cols, cols, mask, mean, rstd, w_ptr, b_ptr, y_ptr, IS_RMS, HAS_W, HAS_B)

    @jit
    def _norm_bwd_rowsum_kernel(dy_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, c_ptr, M, N, HAS_W: tl.constexpr,
                                BLOCK_N: tl.constexpr):
        # Rows wider than one block: c1 = mean(xhat * w dy) and c2 = mean(w dy) per row, over
        # BLOCK_N-column chunks, into c_ptr[0, row] and c_ptr[1, row] for _norm_bwd_kernel.
        row = tl.program_id(0).to(tl.int64)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            mask = cols < N
            s = tl.load(s_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            wdy = tl.load(dy_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                wdy = wdy * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            acc1 += tl.where(mask, (s - mean) * rstd, 0.0) * wdy
            acc2 += wdy
        tl.store(c_ptr + row, tl.sum(acc1, axis=0) / N)
        tl.store(c_ptr + M + row, tl.sum(acc2, axis=0) / N)

    @jit
    def _norm_bwd_kernel(dy_ptr, ds_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, c_ptr, dx_ptr, dw_ptr, db_ptr,
                         M, N, IS_RMS: tl.constexpr, HAS_DS: tl.constexpr, HAS_W: tl.constexpr,
                         HAS_B: tl.constexpr, ROW_SUMS: tl.constexpr, BLOCK_N: tl.constexpr):
        # Program (pid, j) walks rows pid, pid+G, ... over column block j and keeps its share of
        # dw/db there in registers; the G partial rows are summed by the launcher (no atomics,
        # deterministic). ROW_SUMS: the row is wider than one block, its c1/c2 come from
        # _norm_bwd_rowsum_kernel; else the block holds the row and sums it itself.
        pid = tl.program_id(0)
        G = tl.num_programs(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for row in range(pid, M, G):
            off = tl.cast(row, tl.int64) * N + cols
            s = tl.load(s_ptr + off, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            xhat = tl.where(mask, (s - mean) * rstd, 0.0)
            wdy = dy
            if HAS_W:
                wdy = dy * w
            if ROW_SUMS:
                c1 = tl.load(c_ptr + row)
            else:
                c1 = tl.sum(xhat * wdy, axis=0) / N
            if IS_RMS:
                dx = (wdy - xhat * c1) * rstd
            else:
                if ROW_SUMS:
                    c2 = tl.load(c_ptr + M + row)
                else:
                    c2 = tl.sum(wdy, axis=0) / N
                dx = (wdy - xhat * c1 - c2) * rstd
            if HAS_DS:
                dx = dx + tl.load(ds_ptr + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += dy * xhat
            db += dy
        if HAS_W:
            tl.store(dw_ptr + pid * N + cols, dw, mask=mask)
        if HAS_B:
            tl.store(db_ptr + pid * N + cols, db, mask=mask)


# ---------------------------------------------------------------- launchers


# The widest row one block holds in registers without a spill (AOT sm_90): whole-row blocks of
# 16k and 32k columns spilled 324-1624 B, the backward's 8k block 4-120 B (it keeps s, dy, ds,
# the gains and two fp32 partial rows live: 16 fp32 a thread each at 16 warps). Wider rows loop
# over chunks (fwd: two passes in one program; bwd: a row-sum kernel, then a (row group, column
# block) grid); narrower ones keep the one-pass, one-read kernels.
CHUNK = 8192
BWD_CHUNK = 4096


def block_plan(n: int, backward: bool = False) -> tuple[int, bool]:
    """(BLOCK_N, chunked) the forward (or backward) launcher uses for a row of n columns."""
    bn, limit = next_pow2(n), (BWD_CHUNK if backward else CHUNK)
    return (bn, False) if bn <= limit else (limit, True)


def num_warps(block_n: int) -> int:
    """Warps of a forward (and row-sum) program over BLOCK_N columns: 4 up to 2k columns, 8 up to
    the 8k block limit, <= 32 fp32 values a thread (the Triton layer-norm tutorial's rule,
    measured there on A100)."""
    return 4 if block_n <= 2048 else 8


def bwd_num_warps(block_n: int) -> int:
    """Warps of a backward program: it keeps s, dy, the gains and two fp32 partial rows (dw, db)
    live per thread, so 16 warps from 4k columns (its BWD_CHUNK limit), 8 fp32 values a thread
    per tensor."""
    return 16 if block_n >= 4096 else num_warps(block_n)


# What `python -m fastwidth.kernels.aot` compiles: the blocks and warps the launchers pick for the
# model widths up to MAX_N (one block up to 8k columns forward and 4k backward, chunks past them).
AOT_WIDTHS = (1024, 4096, 8192, 16384, 32768)


def _aot_kernels() -> list[AotConfig]:
    """Every norm kind (RMS: gain, no bias; Layer: both) in both dtypes with the residual and the
    residual's gradient on, at each (BLOCK_N, chunked) block_plan gives AOT_WIDTHS, and the row-sum
    kernel at the chunked backward's block."""
    stats = {"mean_ptr": "fp32", "rstd_ptr": "fp32", "rms_ptr": "fp32", "dw_ptr": "fp32", "db_ptr": "fp32",
             "c_ptr": "fp32"}
    fwd_blocks = dict.fromkeys(block_plan(n) for n in AOT_WIDTHS)
    bwd_blocks = dict.fromkeys(block_plan(n, backward=True) for n in AOT_WIDTHS)
    out = []
    for dtype in ("bf16", "fp32"):
        for is_rms in (True, False):
            flags = dict(IS_RMS=is_rms, HAS_W=True, HAS_B=not is_rms)
            out += [AotConfig(_norm_fwd_kernel, dtype, dict(flags, HAS_RES=True, CHUNKED=chunked, BLOCK_N=bn),
                              num_warps(bn), ptr_types=stats, scalar_types={"eps": "fp32"})
                    for bn, chunked in fwd_blocks]
            out += [AotConfig(_norm_bwd_kernel, dtype, dict(flags, HAS_DS=True, ROW_SUMS=chunked, BLOCK_N=bn),
                              bwd_num_warps(bn), ptr_types=stats)
                    for bn, chunked in bwd_blocks]
        out += [AotConfig(_norm_bwd_rowsum_kernel, dtype, dict(HAS_W=True, BLOCK_N=bn), num_warps(bn), ptr_types=stats)
                for bn, chunked in bwd_blocks if chunked]
    return out


AOT_KERNELS = _aot_kernels() if HAS_TRITON else []


def _norm_fwd_launch(x, residual, weight, bias, eps, is_rms):
    N = x.shape[-1]
    if N > MAX_N:
        raise UserError(f"norm kernel: normalized dim {N} exceeds {MAX_N}; use kernels=torch")
    x2 = x.reshape(-1, N).contiguous()
    M = x2.shape[0]
    r2 = residual.reshape(-1, N).contiguous() if residual is not None else x2
    y = torch.empty_like(x2)
    # s as `x + residual` would be: the promoted dtype (bf16 + fp32 is fp32, as under autocast)
    s = x2.new_empty(x2.shape, dtype=torch.result_type(x2, r2)) if residual is not None else x2.new_empty(0)
    mean, rstd, rms = (torch.empty(M, device=x.device, dtype=torch.float32) for _ in range(3))
    if M > 0:
        bn, chunked = block_plan(N)
        _norm_fwd_kernel[(M,)](x2, r2, weight if weight is not None else x2, bias if bias is not None else x2,
                               y, s if residual is not None else y, mean, rstd, rms, N, float(eps),
                               IS_RMS=is_rms, HAS_RES=residual is not None, HAS_W=weight is not None,
                               HAS_B=bias is not None, CHUNKED=chunked, BLOCK_N=bn, num_warps=num_warps(bn))
    lead = x.shape[:-1]
    s_out = s.view(x.shape) if residual is not None else s
    return y.view(x.shape), s_out, mean.view(lead), rstd.view(lead), rms.view(lead)


def _norm_bwd_launch(dy, ds, s, weight, mean, rstd, is_rms, has_bias):
    N = s.shape[-1]
    s2 = s.reshape(-1, N).contiguous()
    M = s2.shape[0]
    dy2 = dy.reshape(-1, N).contiguous()
    ds2 = ds.reshape(-1, N).contiguous() if ds is not None else dy2
    dx = torch.empty_like(s2)
    # ~4 programs an SM on an H200 (132 SMs); 4 in the interpreter, where each is a Python loop.
    G = max(1, min(M, 4 if interpreting(s) else 4 * torch.cuda.get_device_properties(s.device).multi_processor_count))
    part = torch.zeros(2, G, N, device=s.device, dtype=torch.float32)
    if M > 0:
        bn, chunked = block_plan(N, backward=True)
        w = weight if weight is not None else s2
        mean, rstd = mean.reshape(-1).contiguous(), rstd.reshape(-1).contiguous()
        c = torch.empty(2, M, device=s.device, dtype=torch.float32) if chunked else mean
        if chunked:
            _norm_bwd_rowsum_kernel[(M,)](dy2, s2, w, mean, rstd, c, M, N, HAS_W=weight is not None, BLOCK_N=bn,
                                          num_warps=num_warps(bn))
        _norm_bwd_kernel[(G, triton.cdiv(N, bn))](dy2, ds2, s2, w, mean, rstd, c, dx, part[0], part[1], M, N,
                                                  IS_RMS=is_rms, HAS_DS=ds is not None, HAS_W=weight is not None,
                                                  HAS_B=has_bias, ROW_SUMS=chunked, BLOCK_N=bn,
                                                  num_warps=bwd_num_warps(bn))
    dw = part[0].sum(0).to(weight.dtype) if weight is not None else s.new_empty(0)
    db = part[1].sum(0).to(weight.dtype if weight is not None else s.dtype) if has_bias else s.new_empty(0)
    return dx.view(s.shape), dw, db


# ---------------------------------------------------------------- registered ops + autograd


@torch.library.custom_op("fastwidth::norm_fwd", mutates_args=())
def _norm_fwd_op(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                 eps: float, is_rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _norm_fwd_launch(x, residual, weight, bias, eps, is_rms)


@_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, is_rms):
    lead = x.shape[:-1]
    stat = x.new_empty(lead, dtype=torch.float32)
    s = x.new_empty(x.shape, dtype=torch.result_type(x, residual)) if residual is not None else x.new_empty(0)
    return torch.empty_like(x), s, stat, torch.empty_like(stat), torch.empty_like(stat)


@torch.library.custom_op("fastwidth::norm_bwd", mutates_args=())
def _norm_bwd_op(dy: Tensor, ds: Optional[Tensor], s: Tensor, weight: Optional[Tensor], mean: Tensor,
                 rstd: Tensor, is_rms: bool, has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _norm_bwd_launch(dy, ds, s, weight, mean, rstd, is_rms, has_bias)


@_norm_bwd_op.register_fake
def _(dy, ds, s, weight, mean, rstd, is_rms, has_bias):
    dw = torch.empty_like(weight) if weight is not None else s.new_empty(0)
    wdt = weight.dtype if weight is not None else s.dtype
    db = s.new_empty(s.shape[-1], dtype=wdt) if has_bias else s.new_empty(0)
    return torch.empty_like(s), dw, db


def _norm_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms = inputs
    y, s, mean, rstd, rms = output
    ctx.has_res, ctx.is_rms, ctx.has_bias = residual is not None, is_rms, bias is not None
    ctx.mark_non_differentiable(mean, rstd, rms)
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)


def _norm_backward(ctx, dy, ds, _dmean, _drstd, _drms):
    s, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _norm_bwd_op(dy, ds if ctx.has_res else None, s, weight, mean, rstd, ctx.is_rms, ctx.has_bias)
    return (dx, dx if ctx.has_res else None, dw if weight is not None else None,
            db if ctx.has_bias else None, None, None)


_norm_fwd_op.register_autograd(_norm_backward, setup_context=_norm_setup)


def _native_backward(ctx, dy, ds, _dmean, _drstd, _drms):
    s, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.fastwidth_native.norm_bwd(dy, ds if ctx.has_res else None, s, weight, mean, rstd,
                                                     ctx.is_rms, ctx.has_bias)
    return (dx, dx if ctx.has_res else None, dw if weight is not None else None,
            db if ctx.has_bias else None, None, None)


def _register_native() -> None:
    """The native norm ops' fakes (those of the Triton ops above: one statement of the shapes) and autograd."""
    lib = "fastwidth_native::"

    @torch.library.register_fake(lib + "norm_fwd")
    def _(x, residual, weight, bias, eps, is_rms):
        return _norm_fwd_op(x, residual, weight, bias, eps, is_rms)

    @torch.library.register_fake(lib + "norm_bwd")
    def _(dy, ds, s, weight, mean, rstd, is_rms, has_bias):
        return _norm_bwd_op(dy, ds, s, weight, mean, rstd, is_rms, has_bias)

    torch.library.register_autograd(lib + "norm_fwd", _native_backward, setup_context=_norm_setup)


native.register_python_side(_register_native)


# ---------------------------------------------------------------- functional


def _norm(x, residual, weight, bias, eps, is_rms, backend):
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"norm: residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    name = dispatch.resolve(backend, x)
    if name == "native":
        y, s, _, _, rms = native.load().norm_fwd(x, residual, weight, bias, float(eps), is_rms)
        return y, (s if residual is not None else x), rms
    if name == "triton":
        y, s, _, _, rms = _norm_fwd_op(x, residual, weight, bias, float(eps), is_rms)
        return y, (s if residual is not None else x), rms
    return norm_ref(x, residual, weight, bias, eps, is_rms)


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6, backend: str | None = None, *,
             return_rms: bool = False):
    """RMSNorm over the last dim. Outputs: y (x's shape, dtype), plus per-row RMS (fp32,
    x.shape[:-1], no grad) when return_rms."""
    y, _, rms = _norm(x, None, weight, None, eps, True, backend)
    return (y, rms) if return_rms else y


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
               backend: str | None = None, *, return_rms: bool = False):
    """LayerNorm over the last dim; weight/bias may be None. Outputs as rms_norm."""
    y, _, rms = _norm(x, None, weight, bias, eps, False, backend)
    return (y, rms) if return_rms else y


def rms_norm_residual(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float = 1e-6,
                      backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """s = x + residual; y = RMSNorm(s). Outputs: (y, s, rms of s per row)."""
    return _norm(x, residual, weight, None, eps, True, backend)


def layer_norm_residual(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        eps: float = 1e-5, backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """s = x + residual; y = LayerNorm(s). Outputs: (y, s, rms of s per row)."""
    return _norm(x, residual, weight, bias, eps, False, backend)
