"""The µP linear layer fused: y = act(alpha · x Wᵀ + b), one Triton GEMM with the epilogue inside.

alpha is the layer's µP forward multiplier (fastwidth.param.scaling), applied to the product and
not to the bias, as MuLinear's addmm(alpha=mult). act: "none", "gelu" (tanh approximation, as
GPT-2 and kernels/act.py), "relu", or "swiglu": y = silu(alpha·x Wᵀ + b) · (alpha2·x W2ᵀ + b2),
the gate (W, b) and the up projection (W2, b2) read in one pass over x, two accumulators.

Precision: operands in the input dtype (bf16 on the GPU path: Hopper's warp-group MMA), fp32
accumulation, bias and activation in fp32, one rounding at the store. fp32 inputs use IEEE dots
(tf32 would change the low bits against torch's fp32 GEMM).

Backward saves the pre-activation z = alpha·x Wᵀ + b (in the input dtype) instead of recomputing
it. Per output element that is 2 bytes written in the forward and read once in the backward
(bf16); recomputing it is another K multiply-adds, 2K FLOPs: at K = 2048, 4096 FLOPs against 4
bytes, and an H200 does about 200 bf16 FLOPs in the time it moves a byte (989 TFLOP/s, 4.8 TB/s),
so saving is ~5x cheaper. Memory is what eager holds too: eager's GELU keeps its input z, the
fused layer keeps the same z (SwiGLU: z and z2, as eager's swiglu keeps gate and up). With act
"none" nothing extra is saved. Backward: one elementwise pass dz = dy · act'(z), then
dx = alpha · dz W and dW = alpha · dzᵀ x on the same GEMM kernel (operands read through strides,
transposed layouts as constexpr flags), db = Σ_rows dz in fp32.

Limits: x (..., K), W (N, K), 2-D weights only; no TMA tensor descriptors (see TILES). The
Triton kernels themselves are in linear_triton.py.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastwidth.errors import UserError
from fastwidth.kernels import dispatch
from fastwidth.kernels._triton import HAS_TRITON, AotConfig, interpreting, triton
from fastwidth.kernels.amp import autocast_dtype, autocast_off, cast_for_autocast

ACTS = ("none", "gelu", "relu", "swiglu")
ACT_CODE = {a: i for i, a in enumerate(ACTS + ("sum",))}  # "sum": the backward's two-GEMM dx

# ---------------------------------------------------------------- torch reference


def _addmm(x: Tensor, w: Tensor, b: Optional[Tensor], alpha: float) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # (rows, K)
    wt = w.t().to(x2.dtype)
    if b is not None:
        y = torch.addmm(b.to(x2.dtype), x2, wt, alpha=alpha)
    else:
        y = torch.mm(x2, wt)
        if alpha != 1.0:
            y = y * alpha
    return y.reshape(*x.shape[:-1], w.shape[0])


def linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, alpha: float = 1.0, act: str = "none",
               weight2: Optional[Tensor] = None, bias2: Optional[Tensor] = None, alpha2: float = 1.0) -> Tensor:
    """act(alpha · x Wᵀ + b) in eager torch ops, the vendor GEMM with alpha and the bias in it
    (swiglu: silu(that) · (alpha2 · x W2ᵀ + b2))."""
    z = _addmm(x, weight, bias, alpha)
    if act == "none":
        return z
    if act == "gelu":
        return F.gelu(z, approximate="tanh")
    if act == "relu":
        return F.relu(z)
    return F.silu(z) * _addmm(x, weight2, bias2, alpha2)


# ---------------------------------------------------------------- Triton kernels (linear_triton.py)

if HAS_TRITON:
    from fastwidth.kernels.linear_triton import _linear_bwd_act_kernel, _linear_kernel


# ---------------------------------------------------------------- launcher

# GPU tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), bf16/fp16, from Triton's matmul
# tutorial's H100 table, kept where python -m fastwidth.kernels.aot shows 0 spills and wgmma:
#   "large"  128x128x64, 8 warps, 3 stages: two warp groups of 64 rows (wgmma's granularity),
#            a 128x128 fp32 accumulator is 64 registers a thread; 3 stages of A and B tiles
#            (2 x 128 x 64 x 2 B = 32 KB each) are 96 KB of shared memory.
#   "small"  64x128x64, 4 warps, 4 stages: one warp group, for grids that 128x128 tiles would
#            leave under one wave of the 132 SMs (small M: the dW GEMMs of narrow layers, short
#            batches); 4 stages (96 KB) hide HBM latency with half the tile.
#   "glu"    swiglu holds two accumulators: 128x64x64 at 8 warps keeps them at 64 registers a
#            thread together; the A tile and two B tiles are 32 KB a stage, 3 stages 96 KB.
#   "unaligned"  a stride or extent not a multiple of 8 (an odd shape): loads cannot vectorize
#            or go through cp.async, every element is a scalar load in registers; 64x64x32 at
#            4 warps is the largest tile that holds 0 spills for every activation then.
#   "fp32"   the explicit fp32 path (IEEE dots, no tensor cores: the default sends fp32 on a GPU
#            to cuBLAS): 64x64x16 at 4 warps, 2 stages (BLOCK_K 32 spilled 16-336 B in the dx GEMMs).
# Not TMA: a tensor descriptor needs 16-byte aligned strides (an odd K such as 781 in bf16 is not)
# and triton 3.6's device-side descriptors need a global scratch allocator (triton.set_allocator);
# plain pointers run everywhere and the pipeliner still overlaps loads (cp.async) with wgmma.
TILES = {"large": (128, 128, 64, 8, 3), "small": (64, 128, 64, 4, 4), "glu": (128, 64, 64, 8, 3),
         "unaligned": (64, 64, 32, 4, 3), "fp32": (64, 64, 16, 4, 2)}
# Interpreter: one fixed tile (no autotune there); 32 keeps tl.dot >= 16 on every side and crosses
# tile edges at the tests' odd shapes.
INTERP_TILE = (32, 32, 32, 4, 1)
GROUP_M = 8
_SMS = 132  # H100/H200 SXM; only decides large vs small
# The backward's elementwise dz pass: 1024 elements a program at 4 warps, as kernels/act.py.
ELEM_BLOCK = 1024
ELEM_WARPS = 4


def tile_for(M: int, N: int, dtype: torch.dtype, act: str, interp: bool, aligned: bool = True
             ) -> tuple[int, int, int, int, int]:
    """The (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) a launch at this shape uses."""
    if interp:
        return INTERP_TILE
    if dtype == torch.float32:
        return TILES["fp32"]
    if not aligned:
        return TILES["unaligned"]
    if act in ("swiglu", "sum"):
        return TILES["glu"]
    bm, bn = TILES["large"][:2]
    return TILES["large"] if triton.cdiv(M, bm) * triton.cdiv(N, bn) >= _SMS else TILES["small"]


def _aot_kernels() -> list[AotConfig]:
    """What `python -m fastwidth.kernels.aot` compiles: every launch of the GEMM on each tile
    tile_for can pick, with strides and extents multiples of 8 (ALIGNED, the model widths) and
    not: the forward per activation (bias and a saved pre-activation: training, the most
    registers), the backward's dx GEMM (W column-major; swiglu's halves summed in one launch) and
    dW GEMM (both operands column-major); and the dz pass per activation."""
    out = []
    for dtype in ("bf16", "fp32"):
        tiles = ["large", "small"] if dtype == "bf16" else ["fp32"]
        glu = "glu" if dtype == "bf16" else "fp32"
        # (act, tile, A K-contiguous, B K-contiguous, bias and saved z)
        gemms = [(act, t, True, True, True) for act in ("none", "gelu", "relu") for t in tiles]
        gemms += [("swiglu", glu, True, True, True), ("sum", glu, True, False, False)]
        gemms += [("none", t, a_kc, False, False) for t in tiles for a_kc in (True, False)]
        # unaligned (odd) shapes: bf16 on its own tile, whatever the activation
        for (act, t, a_kc, b_kc, train), aligned in [(g, al) for g in gemms for al in (True, False)]:
            if not aligned and dtype == "bf16":
                if t not in ("large", "glu"):
                    continue
                t = "unaligned"
            m, n, k, warps, stages = TILES[t]
            cx = dict(ACT=ACT_CODE[act], HAS_BIAS=train, SAVE_Z=train and act != "none", A_K_CONTIG=a_kc,
                      B_K_CONTIG=b_kc, ALIGNED=aligned, IEEE=dtype == "fp32", UPCAST=False, BLOCK_M=m, BLOCK_N=n,
                      BLOCK_K=k, GROUP_M=GROUP_M)
            out.append(AotConfig(_linear_kernel, dtype, cx, warps, stages,
                                 scalar_types={"alpha": "fp32", "alpha2": "fp32"}))
        for act in ("gelu", "relu", "swiglu"):
            out.append(AotConfig(_linear_bwd_act_kernel, dtype, dict(ACT=ACT_CODE[act], UPCAST=False, BLOCK=ELEM_BLOCK),
                                 ELEM_WARPS, scalar_types={"n": "i64"}))
    return out


AOT_KERNELS = _aot_kernels() if HAS_TRITON else []


def _k_layout(t: Tensor) -> tuple[Tensor, bool, int]:
    """(t, K contiguous?, the other stride) for an operand t (rows, K), copying only when neither
    dimension is contiguous."""
    if t.stride(1) == 1:
        return t, True, t.stride(0)
    if t.stride(0) == 1:
        return t, False, t.stride(1)
    t = t.contiguous()
    return t, True, t.stride(0)


def _same_layout(t: Tensor, like: Tensor) -> Tensor:
    """t with like's strides (t and like of one shape): the kernel reads both with one stride."""
    return t if t.stride() == like.stride() else torch.empty_strided(like.shape, like.stride(), dtype=t.dtype,
                                                                     device=t.device).copy_(t)


def _gemm(a: Tensor, b: Tensor, alpha: float, *, out_dtype: torch.dtype, act: str = "none", bias=None,
          a2=None, b2=None, bias2=None, alpha2: float = 1.0, save_z: bool = False):
    """act(alpha · a bᵀ + bias) for a (M, K), b (N, K) of any strides (swiglu: with b2, bias2;
    "sum": alpha · a bᵀ + alpha2 · a2 b2ᵀ); (y, z, z2) with z, z2 the saved pre-activations
    (empty unless save_z)."""
    M, K = a.shape
    N = b.shape[0]
    a, a_kc, sa = _k_layout(a)
    b, b_kc, sb = _k_layout(b)
    a2 = a if a2 is None else _same_layout(a2, a)
    b2 = b if b2 is None else _same_layout(b2, b)
    y = torch.empty(M, N, device=a.device, dtype=out_dtype)
    e = a.new_empty(0)  # stands in for absent pointers; never returned
    z = torch.empty_like(y) if save_z else a.new_empty(0)
    z2 = torch.empty_like(y) if save_z and act == "swiglu" else a.new_empty(0)
    interp = interpreting(a)
    aligned = all(v % 8 == 0 for v in (sa, sb, M, N, K))
    bm, bn, bk, warps, stages = tile_for(M, N, a.dtype, act, interp, aligned)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _linear_kernel[grid](a, a2, b, b2, e if bias is None else bias, e if bias2 is None else bias2, y, z, z2,
                         M, N, K, sa, sb, float(alpha), float(alpha2),
                         ACT=ACT_CODE[act], HAS_BIAS=bias is not None, SAVE_Z=save_z, A_K_CONTIG=a_kc,
                         B_K_CONTIG=b_kc, ALIGNED=aligned,
                         IEEE=a.dtype == torch.float32, UPCAST=interp, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                         GROUP_M=GROUP_M, num_warps=warps, num_stages=stages)
    return y, z, z2


def _linear_fwd_launch(x2, w, b, w2, b2, alpha, alpha2, act, save):
    if act not in ACTS:
        raise UserError(f"linear: act {act!r} is not one of {', '.join(ACTS)}")
    if act == "swiglu" and (b is None) != (b2 is None):  # the kernel adds both biases or neither
        zero = torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
        b, b2 = (zero if b is None else b), (zero if b2 is None else b2)
    return _gemm(x2, w, alpha, out_dtype=x2.dtype, act=act, bias=b, b2=w2, bias2=b2, alpha2=alpha2,
                 save_z=save and act != "none")


def _linear_bwd_launch(dy, x2, w, w2, z, z2, alpha, alpha2, act, has_b, has_b2):
    dy = dy.contiguous()
    dz, dz2 = dy, None
    if act != "none":
        n = dy.numel()
        dz = torch.empty_like(z)
        dz2 = torch.empty_like(z) if act == "swiglu" else None
        e = dz.new_empty(0)
        _linear_bwd_act_kernel[(triton.cdiv(n, ELEM_BLOCK),)](dy, z, e if z2 is None else z2, dz,
                                                              e if dz2 is None else dz2, n, ACT=ACT_CODE[act],
                                                              UPCAST=interpreting(dy), BLOCK=ELEM_BLOCK,
                                                              num_warps=ELEM_WARPS)
    # dx = alpha dz W (+ alpha2 dz2 W2, one GEMM with two accumulators): W read as (K, N)
    if dz2 is None:
        dx, _, _ = _gemm(dz, w.t(), alpha, out_dtype=x2.dtype)
    else:
        dx, _, _ = _gemm(dz, w.t(), alpha, out_dtype=x2.dtype, act="sum", a2=dz2, b2=w2.t(), alpha2=alpha2)
    dw, _, _ = _gemm(dz.t(), x2.t(), alpha, out_dtype=w.dtype)  # (N, M) x (M, K)
    db = dz.sum(0, dtype=torch.float32).to(w.dtype) if has_b else x2.new_empty(0)
    dw2, db2 = x2.new_empty(0), x2.new_empty(0)
    if dz2 is not None:
        dw2, _, _ = _gemm(dz2.t(), x2.t(), alpha2, out_dtype=w2.dtype)
        if has_b2:
            db2 = dz2.sum(0, dtype=torch.float32).to(w2.dtype)
    return dx, dw, db, dw2, db2


# ---------------------------------------------------------------- registered ops + autograd


@torch.library.custom_op("fastwidth::linear_fwd", mutates_args=())
def _linear_fwd_op(x2: Tensor, w: Tensor, b: Optional[Tensor], w2: Optional[Tensor], b2: Optional[Tensor],
                   alpha: float, alpha2: float, act: str, save: bool) -> tuple[Tensor, Tensor, Tensor]:
    with autocast_off(x2):  # the functional chose the dtypes
        return _linear_fwd_launch(x2, w, b, w2, b2, alpha, alpha2, act, save)


@_linear_fwd_op.register_fake
def _(x2, w, b, w2, b2, alpha, alpha2, act, save):
    y = x2.new_empty(x2.shape[0], w.shape[0])
    z = torch.empty_like(y) if save and act != "none" else x2.new_empty(0)
    return y, z, torch.empty_like(y) if save and act == "swiglu" else x2.new_empty(0)


@torch.library.custom_op("fastwidth::linear_bwd", mutates_args=())
def _linear_bwd_op(dy: Tensor, x2: Tensor, w: Tensor, w2: Optional[Tensor], z: Tensor, z2: Optional[Tensor],
                   alpha: float, alpha2: float, act: str, has_b: bool, has_b2: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(x2):
        return _linear_bwd_launch(dy, x2, w, w2, z, z2, alpha, alpha2, act, has_b, has_b2)


@_linear_bwd_op.register_fake
def _(dy, x2, w, w2, z, z2, alpha, alpha2, act, has_b, has_b2):
    e = x2.new_empty(0)
    glu = act == "swiglu"
    return (torch.empty_like(x2), torch.empty_like(w), w.new_empty(w.shape[0]) if has_b else e,
            torch.empty_like(w2) if glu else e, w2.new_empty(w2.shape[0]) if glu and has_b2 else e)


def _linear_setup(ctx, inputs, output):
    x2, w, b, w2, b2, alpha, alpha2, act, save = inputs
    _, z, z2 = output
    ctx.alpha, ctx.alpha2, ctx.act = alpha, alpha2, act
    ctx.has_b, ctx.has_b2 = b is not None, b2 is not None
    ctx.mark_non_differentiable(z, z2)
    ctx.save_for_backward(x2, w, w2, z, z2 if act == "swiglu" else None)


def _linear_backward(ctx, dy, _dz, _dz2):
    x2, w, w2, z, z2 = ctx.saved_tensors
    if ctx.act != "none" and z.numel() == 0 and dy.numel() != 0:
        raise RuntimeError("linear: backward through a forward that ran without saving its pre-activation")
    dx, dw, db, dw2, db2 = _linear_bwd_op(dy, x2, w, w2, z, z2, ctx.alpha, ctx.alpha2, ctx.act, ctx.has_b,
                                          ctx.has_b2)
    glu = ctx.act == "swiglu"
    return (dx, dw, db if ctx.has_b else None, dw2 if glu else None, db2 if glu and ctx.has_b2 else None,
            None, None, None, None)


_linear_fwd_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# ---------------------------------------------------------------- functional


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, alpha: float = 1.0, act: str = "none",
           weight2: Optional[Tensor] = None, bias2: Optional[Tensor] = None, alpha2: float = 1.0,
           backend: str | None = None) -> Tensor:
    """act(alpha · x Wᵀ + b): the µP linear layer with its multiplier, bias and activation fused.

    Inputs: x (..., K); weight (N, K); bias (N,) or None; alpha (the µP forward multiplier, not
    applied to the bias); act none | gelu | relu | swiglu; for swiglu, weight2 (N, K), bias2 and
    alpha2 of the up projection (y = silu(gate) · up, gate from weight). backend: torch | triton |
    None (process default; fp32 on a GPU without autocast goes to cuBLAS, as attention's SDPA).
    Outputs: (..., N) in x's dtype (autocast's under autocast, as F.linear).
    """
    if act not in ACTS:
        raise UserError(f"linear: act {act!r} is not one of {', '.join(ACTS)}")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K or (act == "swiglu") != (weight2 is not None) or \
            (weight2 is not None and weight2.shape != weight.shape):
        raise ValueError(f"linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, weight2 "
                         f"{None if weight2 is None else tuple(weight2.shape)} do not fit (x (..., K), weight (N, K), "
                         "weight2 of weight's shape exactly when act is swiglu)")
    name = dispatch.resolve(backend, x)
    if name == "triton" and backend is None and x.is_cuda and autocast_dtype(x) is None and x.dtype == torch.float32:
        name = "torch"  # IEEE fp32 dots run without tensor cores; an explicit backend="triton" still gets them
    if name != "triton":
        return linear_ref(x, weight, bias, alpha, act, weight2, bias2, alpha2)
    x2, weight, bias, weight2, bias2 = cast_for_autocast(x.reshape(-1, K), weight, bias, weight2, bias2)
    dt = x2.dtype
    cast = [None if t is None else t.to(dt) for t in (weight, bias, weight2, bias2)]
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, *cast))
    y, _, _ = _linear_fwd_op(x2, *cast, float(alpha), float(alpha2), act, save)
    return y.view(*x.shape[:-1], weight.shape[0])
