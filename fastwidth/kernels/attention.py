"""Scaled dot-product attention with an explicit softmax scale (µP: attn_mult / head_dim).

Backends, all taking the scale explicitly (a scale accepted but never applied is a known bug
in other trainers; tests/kernels/test_attention.py checks every backend both receives it and
changes its output with it):
  "torch"  F.scaled_dot_product_attention(..., scale=scale) (flash / cuDNN / math inside torch)
  "math"   the explicit softmax(q k^T * scale) v reference below
  "flash"  flash_attn.flash_attn_func(..., softmax_scale=scale) when importable
  "triton" the FlashAttention-2 style kernels of attention_triton.py, launched here
Shapes: q (B, H, T, D), k and v (B, Hkv, T, D) with H % Hkv == 0 (grouped-query heads: query
head h reads kv head h // (H / Hkv)). Optional max logit, (B, H) fp32: the largest
scale * q.k over all visible (query, key) pairs of each head, an attention-instability signal.
Triton limits: 16 <= D <= 128; q, k, v one dtype (bf16 or fp16 on a GPU, fp32 too interpreted on
the CPU; fp32 on a GPU runs SDPA); equal query/key lengths.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from fastwidth.errors import UserError
from fastwidth.kernels import dispatch
from fastwidth.kernels._triton import HAS_TRITON, AotConfig, interpreting, next_pow2, triton
from fastwidth.kernels.amp import autocast_dtype, cast_for_autocast

BACKENDS = ("torch", "math", "flash", "triton")
_LOG2E = 1.4426950408889634

# ---------------------------------------------------------------- torch reference


def _expand_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    g = q.shape[1] // k.shape[1]
    if g == 1:
        return k, v
    return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = True) -> tuple[Tensor, Tensor]:
    """Explicit attention. Outputs: o (B, H, T, D) in q.dtype, max logit (B, H) fp32+ (no grad)."""
    k, v = _expand_kv(q, k, v)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for an fp64 reference
    s = (q @ k.transpose(-1, -2)).to(acc) * scale  # (B, H, T, T)
    if causal:
        T = q.shape[2]
        keep = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = (p.to(v.dtype) @ v).to(q.dtype)
    return o, s.detach().amax(dim=(-1, -2))


def max_logit_ref(q: Tensor, k: Tensor, scale: float, causal: bool, rows: int = 1024) -> Tensor:
    """(B, H) max of scale * q.k over (causally) visible pairs, in query chunks (no T x T at once)."""
    k, _ = _expand_kv(q, k, k)
    T = q.shape[2]
    out = None
    with torch.no_grad():
        for a in range(0, T, rows):
            s = (q[:, :, a:a + rows] @ k.transpose(-1, -2)).float() * scale
            if causal:
                i = torch.arange(a, min(T, a + rows), device=q.device)[:, None]
                s = s.masked_fill(torch.arange(T, device=q.device)[None, :] > i, float("-inf"))
            m = s.amax(dim=(-1, -2))
            out = m if out is None else torch.maximum(out, m)
    return out


# ---------------------------------------------------------------- Triton kernels (attention_triton.py)

if HAS_TRITON:
    from fastwidth.kernels.attention_triton import (_attn_bwd_delta_kernel, _attn_bwd_dkdv_kernel,
                                                    _attn_bwd_dq_kernel, _attn_fwd_kernel)


# ---------------------------------------------------------------- launchers

# Interpreter: one fixed tile per kernel (32 is the smallest that still crosses tile edges at
# T=37 and keeps tl.dot >= 16 on every side); a test may set another. GPU bf16/fp16: autotuned
# over (BLOCK_M, BLOCK_N, warps, stages), per head dim, every config one that compiles for sm_90
# without a register spill, with every dot on Hopper's warp-group MMA (wgmma), within the shared
# memory of a block: `python -m fastwidth.kernels.aot` proves it, bench/aot_sm90.csv is its table.
# wgmma needs 64 accumulator rows a warp group, so every tile puts >= 64 rows on the dots' M side:
# fwd and dQ 64 or 128 queries, dK/dV 64 keys (FlashAttention-2's split: dK/dV a key block over
# all queries, dQ a separate pass over keys, no atomics). At head_dim 128 a dK/dV block keeps k,
# v and two fp32 (64, 128) accumulators live: 4 warps spill (255 registers a thread), 8 warps
# (two warp groups, each half the columns) hold them, with 16-query tiles (32 spill 8 B causal);
# 128 keys spill at any width. dQ at head_dim 128: 8 warps (4 spill 16-120 B).
# Causal masking needs fwd/dq BLOCK_M % BLOCK_N == 0 and dk/dv BLOCK_N % BLOCK_M == 0.
# fp32 on a GPU runs SDPA (the IEEE Triton path has no tensor cores: ~10x slower, and its tiles
# spill); the interpreter keeps fp32 for the CPU tests.
INTERP_TILES = {k: dict(BLOCK_M=32, BLOCK_N=32) for k in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel",
                                                           "_attn_bwd_dq_kernel")}
FWD_CONFIGS = {64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
               128: [(128, 64, 8, 3), (64, 64, 4, 3)]}
DKDV_CONFIGS = {64: [(32, 64, 8, 3), (64, 64, 8, 3), (16, 64, 8, 3)],
                128: [(16, 64, 8, 2), (16, 64, 8, 3)]}
DQ_CONFIGS = {64: [(128, 64, 8, 3), (64, 64, 4, 4), (64, 32, 4, 3)],
              128: [(64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3)]}
HEAD_DIMS = (64, 128)  # the head dims the tables above are keyed by: a launch takes the first >= its own
# delta = rowsum(dO * O): 64 rows a program, 4 warps; it has no loop, so one stage (nothing to pipeline)
DELTA_ROWS = 64
DELTA_WARPS = 4
DELTA_STAGES = 1
_tuned: dict = {}


def tile_configs(kernel_name: str, head_dim: int) -> list[tuple[int, int, int, int]]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) a GPU launch at this head dim may pick (bf16/fp16)."""
    table = {"_attn_fwd_kernel": FWD_CONFIGS, "_attn_bwd_dkdv_kernel": DKDV_CONFIGS,
             "_attn_bwd_dq_kernel": DQ_CONFIGS}[kernel_name]
    return table[64 if head_dim <= 64 else 128]


def _aot_kernels() -> list[AotConfig]:
    """What `python -m fastwidth.kernels.aot` compiles: every tile the autotuner may pick, at each
    of HEAD_DIMS, causal and not, and the delta kernel at each head dim. bf16 only: fp32 on a GPU
    runs SDPA (_kernel_for refuses it) and fp16 shares bf16's tiles. The group size G (query heads
    per kv head) is an unspecialized i32 here, so each row is the grouped-query kernel for any G;
    a launch without grouping (G = 1) gets Triton's specialization of that same code."""
    stats = {"lse_ptr": "fp32", "mx_ptr": "fp32", "delta_ptr": "fp32"}
    scales = {"qk_scale": "fp32", "scale": "fp32"}
    out = []
    for fn in (_attn_fwd_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel):
        for D in HEAD_DIMS:
            for m, n, warps, stages in tile_configs(fn.__name__, D):
                for causal in (True, False):
                    cx = dict(CAUSAL=causal, IEEE=False, UPCAST=False, BLOCK_M=m, BLOCK_N=n, BLOCK_D=D)
                    out.append(AotConfig(fn, "bf16", cx, warps, stages, stats, scales))
    for D in HEAD_DIMS:
        out.append(AotConfig(_attn_bwd_delta_kernel, "bf16", dict(BLOCK_M=DELTA_ROWS, BLOCK_D=D), DELTA_WARPS,
                             DELTA_STAGES, stats))
    return out


AOT_KERNELS = _aot_kernels() if HAS_TRITON else []


def _kernel_for(kernel, x: Tensor, head_dim: int):
    """The kernel to launch and the tile kwargs to pass (none when autotuned)."""
    name = kernel.fn.__name__
    if interpreting(x):
        return kernel, dict(INTERP_TILES[name], num_warps=4)
    if x.dtype == torch.float32:
        raise UserError("attention backend='triton' on a GPU takes bf16 or fp16 (or fp32 under autocast); "
                        "fp32 runs on backend='torch' (SDPA), the default for fp32")
    key = (name, 64 if head_dim <= 64 else 128)
    if key not in _tuned:
        cfgs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                for m, n, w, st in tile_configs(name, head_dim)]
        _tuned[key] = triton.autotune(configs=cfgs, key=["T", "D", "G", "CAUSAL", "IEEE", "UPCAST"])(kernel)
    return _tuned[key], {}


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "must be (B, H, T, D) and (B, Hkv, T, D)")
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[1] != 0:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} do not fit "
                         "(same B and D, H a multiple of Hkv)")


def _strides(*ts: Tensor) -> list[int]:
    return [s for t in ts for s in (t.stride(0), t.stride(1), t.stride(2))]


def _last_contig(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _attn_fwd_launch(q, k, v, scale, causal):
    B, H, T, D = q.shape
    G = H // k.shape[1]
    if not 16 <= D <= 128:
        raise UserError(f"attention backend='triton': head_dim {D} is outside 16..128; use backend='torch'")
    if k.shape[2] != T:
        raise UserError(f"attention backend='triton': key length {k.shape[2]} != query length {T}")
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    o = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    mx = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    kern, kw = _kernel_for(_attn_fwd_kernel, q, D)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    kern[grid](q, k, v, o, lse, mx, *_strides(q, k, v), H, G, T, D, float(scale) * _LOG2E,
               CAUSAL=causal, IEEE=q.dtype == torch.float32, UPCAST=interpreting(q), BLOCK_D=max(16, next_pow2(D)),
               **kw)
    return o, lse, mx


def _attn_bwd_launch(do, q, k, v, o, lse, scale, causal):
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    do, o = do.contiguous(), o.contiguous()
    block_d = max(16, next_pow2(D))
    delta = torch.empty(B, H, T, device=q.device, dtype=torch.float32)  # rowsum(dO * O), FA-2 Alg. 2
    R = B * H * T
    _attn_bwd_delta_kernel[(triton.cdiv(R, DELTA_ROWS),)](o, do, delta, R, D, BLOCK_M=DELTA_ROWS, BLOCK_D=block_d,
                                                          num_warps=DELTA_WARPS, num_stages=DELTA_STAGES)
    dq = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, Hkv, T, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, Hkv, T, D, device=q.device, dtype=v.dtype)
    common = dict(CAUSAL=causal, IEEE=q.dtype == torch.float32, UPCAST=interpreting(q), BLOCK_D=block_d)
    args = (*_strides(q, k, v), H, G, T, D, float(scale) * _LOG2E, float(scale))
    kern, kw = _kernel_for(_attn_bwd_dkdv_kernel, q, D)
    kern[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * Hkv)](q, k, v, do, lse, delta, dk, dv, *args,
                                                                  **common, **kw)
    kern, kw = _kernel_for(_attn_bwd_dq_kernel, q, D)
    kern[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](q, k, v, do, lse, delta, dq, *args, **common, **kw)
    return dq, dk, dv


# ---------------------------------------------------------------- registered ops + autograd


@torch.library.custom_op("fastwidth::attention_fwd", mutates_args=())
def _attn_fwd_op(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _attn_fwd_launch(q, k, v, scale, causal)


@_attn_fwd_op.register_fake
def _(q, k, v, scale, causal):
    B, H, T, D = q.shape
    st = q.new_empty(B, H, T, dtype=torch.float32)
    return q.new_empty(B, H, T, D), st, torch.empty_like(st)


@torch.library.custom_op("fastwidth::attention_bwd", mutates_args=())
def _attn_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float,
                 causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _attn_bwd_launch(do, q, k, v, o, lse, scale, causal)


@_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup(ctx, inputs, output):
    q, k, v, scale, causal = inputs
    o, lse, mx = output
    ctx.scale, ctx.causal = scale, causal
    ctx.mark_non_differentiable(lse, mx)
    ctx.save_for_backward(q, k, v, o, lse)


def _attn_backward(ctx, do, _dlse, _dmx):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _attn_bwd_op(do, q, k, v, o, lse, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None


_attn_fwd_op.register_autograd(_attn_backward, setup_context=_attn_setup)


# ---------------------------------------------------------------- functional


def _load_flash():
    """flash_attn.flash_attn_func, or a one-line error when the package is not importable."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        raise UserError("attention backend='flash' needs the flash-attn package (CUDA only); "
                        "use backend='torch' or 'triton'") from None
    return flash_attn_func


def flash_available() -> bool:
    try:
        _load_flash()
        return True
    except UserError:
        return False


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = True, backend: str | None = None,
              return_max_logit: bool = False):
    """softmax(q k^T * scale [+ causal mask]) v.

    Inputs: q (B, H, T, D); k, v (B, Hkv, T, D), H % Hkv == 0; scale (µP: attn_mult / head_dim,
    always explicit); backend torch | math | flash | triton | None (process default: triton
    when kernels resolve to triton, else torch).
    Outputs: o (B, H, T, D) in q's dtype; with return_max_logit, (o, max_logit (B, H) fp32, no grad).
    """
    _check(q, k, v)
    name = dispatch.resolve(backend, q, extra=("math", "flash"))
    if name == "triton" and backend is None and q.is_cuda and autocast_dtype(q) is None and q.dtype == torch.float32:
        # fp32 on a GPU: SDPA (the Triton kernels have no fp32 GPU tiles; an explicit
        # backend="triton" is refused with one line by the launcher)
        name = "torch"
    scale = float(scale)
    mx = None
    if name == "triton":
        q, k, v = cast_for_autocast(q, k, v)  # as autocast casts SDPA's inputs
        o, _, rows = _attn_fwd_op(q, k, v, scale, causal)
        mx = rows.amax(dim=-1) if return_max_logit else None
    elif name == "math":
        o, mx = attention_ref(q, k, v, scale, causal)
    elif name == "flash":
        fn = _load_flash()
        o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal)
        o = o.transpose(1, 2)  # flash-attn is (B, T, H, D); back to (B, H, T, D)
    else:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if not return_max_logit:
        return o
    if mx is None:
        mx = max_logit_ref(q, k, scale, causal)
    return o, mx.float()
