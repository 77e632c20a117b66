"""Scaled dot-product attention with an explicit softmax scale (µP: attn_mult / head_dim).

Backends, all taking the scale explicitly (a scale accepted but never applied is a known bug
in other trainers; tests/kernels/test_attention.py checks every backend both receives it and
changes its output with it):
  "torch"  F.scaled_dot_product_attention(..., scale=scale) (flash / cuDNN / math inside torch)
  "math"   the explicit softmax(q k^T * scale) v reference below
  "flash"  flash_attn.flash_attn_func(..., softmax_scale=scale) when importable
  "triton" the FlashAttention-2 style kernels in this file
Shapes: q (B, H, T, D), k and v (B, Hkv, T, D) with H % Hkv == 0 (grouped-query heads: query
head h reads kv head h // (H / Hkv)). Optional max logit, (B, H) fp32: the largest
scale * q.k over all visible (query, key) pairs of each head, an attention-instability signal.
Triton limits: 16 <= D <= 128; q, k, v one dtype (fp32, fp16, bf16); equal query/key lengths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastwidth.errors import UserError
from fastwidth.kernels import dispatch
from fastwidth.kernels._triton import HAS_TRITON, interpreting, jit, next_pow2, tl, triton
from fastwidth.kernels.amp import cast_for_autocast

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


# ---------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @jit
    def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, mx_ptr,
                         sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                         H, G, T, D, qk_scale,
                         CAUSAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # Online softmax in log2 units (qk_scale = scale * log2 e), as FlashAttention-2.
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // G
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n0 = tl.arange(0, BLOCK_N)
        dmask = offs_d < D
        q_base = q_ptr + tl.cast(b, tl.int64) * sqb + tl.cast(h, tl.int64) * sqh
        k_base = k_ptr + tl.cast(b, tl.int64) * skb + tl.cast(hk, tl.int64) * skh
        v_base = v_ptr + tl.cast(b, tl.int64) * svb + tl.cast(hk, tl.int64) * svh
        q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :],
                    mask=(offs_m[:, None] < T) & dmask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
            q = q.to(tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        hi = T
        if CAUSAL:
            hi = tl.minimum(T, (pid_m + 1) * BLOCK_M)
        for n0 in range(0, hi, BLOCK_N):
            offs_n = n0 + offs_n0
            kv_mask = (offs_n[None, :] < T) & dmask[:, None]
            kt = tl.load(k_base + offs_n[None, :] * skt + offs_d[:, None], mask=kv_mask, other=0.0)  # (D, N)
            if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
                kt = kt.to(tl.float32)
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = s * qk_scale
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :],
                        mask=(offs_n[:, None] < T) & dmask[None, :], other=0.0)
            if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
                v = v.to(tl.float32)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        o = acc / l_i[:, None]
        rmask = offs_m < T
        row = bh * T + offs_m
        tl.store(o_ptr + tl.cast(bh, tl.int64) * T * D + offs_m[:, None] * D + offs_d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
        tl.store(lse_ptr + row, m_i + tl.log2(l_i), mask=rmask)
        tl.store(mx_ptr + row, m_i / 1.4426950408889634, mask=rmask)

    @jit
    def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                              sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                              H, G, T, D, qk_scale, scale,
                              CAUSAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per (key block, batch, kv head); loops over the G query heads sharing
        # it, so grouped-query dk/dv need no atomics and no (B, H, T, D) temporaries.
        pid_n = tl.program_id(0)
        bhk = tl.program_id(1)
        Hkv = H // G
        b = bhk // Hkv
        hk = bhk % Hkv
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        nmask = offs_n < T
        k = tl.load(k_ptr + tl.cast(b, tl.int64) * skb + tl.cast(hk, tl.int64) * skh + offs_n[:, None] * skt
                    + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
            k = k.to(tl.float32)
        v = tl.load(v_ptr + tl.cast(b, tl.int64) * svb + tl.cast(hk, tl.int64) * svh + offs_n[:, None] * svt
                    + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
            v = v.to(tl.float32)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        lo = 0
        if CAUSAL:
            lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
        for g in range(0, G):
            h = hk * G + g
            bh = b * H + h
            q_base = q_ptr + tl.cast(b, tl.int64) * sqb + tl.cast(h, tl.int64) * sqh
            do_base = do_ptr + tl.cast(bh, tl.int64) * T * D
            for m0 in range(lo, T, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                mmask = offs_m < T
                qt = tl.load(q_base + offs_m[None, :] * sqt + offs_d[:, None],
                             mask=mmask[None, :] & dmask[:, None], other=0.0)  # (D, M)
                if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
                    qt = qt.to(tl.float32)
                do = tl.load(do_base + offs_m[:, None] * D + offs_d[None, :],
                             mask=mmask[:, None] & dmask[None, :], other=0.0)  # (M, D)
                if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
                    do = do.to(tl.float32)
                lse = tl.load(lse_ptr + bh * T + offs_m, mask=mmask, other=0.0)
                delta = tl.load(delta_ptr + bh * T + offs_m, mask=mmask, other=0.0)
                if IEEE:
                    st = tl.dot(k, qt, input_precision="ieee")
                else:
                    st = tl.dot(k, qt)
                keep = mmask[None, :] & nmask[:, None]
                if CAUSAL:
                    keep = keep & (offs_n[:, None] <= offs_m[None, :])
                pt = tl.where(keep, tl.exp2(st * qk_scale - lse[None, :]), 0.0)  # (N, M)
                if IEEE:
                    dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
                    dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
                else:
                    dv += tl.dot(pt.to(do.dtype), do)
                    dpt = tl.dot(v, tl.trans(do))
                dst = pt * (dpt - delta[None, :])
                if IEEE:
                    dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision="ieee")
                else:
                    dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
        out = tl.cast(bhk, tl.int64) * T * D + offs_n[:, None] * D + offs_d[None, :]
        omask = nmask[:, None] & dmask[None, :]
        tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=omask)
        tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=omask)

    @jit
    def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                            sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                            H, G, T, D, qk_scale, scale,
                            CAUSAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // G
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n0 = tl.arange(0, BLOCK_N)
        dmask = offs_d < D
        mmask = offs_m < T
        q = tl.load(q_ptr + tl.cast(b, tl.int64) * sqb + tl.cast(h, tl.int64) * sqh + offs_m[:, None] * sqt
                    + offs_d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
            q = q.to(tl.float32)
        do = tl.load(do_ptr + tl.cast(bh, tl.int64) * T * D + offs_m[:, None] * D + offs_d[None, :],
                     mask=mmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
            do = do.to(tl.float32)
        lse = tl.load(lse_ptr + bh * T + offs_m, mask=mmask, other=0.0)
        delta = tl.load(delta_ptr + bh * T + offs_m, mask=mmask, other=0.0)
        k_base = k_ptr + tl.cast(b, tl.int64) * skb + tl.cast(hk, tl.int64) * skh
        v_base = v_ptr + tl.cast(b, tl.int64) * svb + tl.cast(hk, tl.int64) * svh
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        hi = T
        if CAUSAL:
            hi = tl.minimum(T, (pid_m + 1) * BLOCK_M)
        for n0 in range(0, hi, BLOCK_N):
            offs_n = n0 + offs_n0
            nmask = offs_n < T
            k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :],
                        mask=nmask[:, None] & dmask[None, :], other=0.0)  # (N, D)
            if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
                k = k.to(tl.float32)
            vt = tl.load(v_base + offs_n[None, :] * svt + offs_d[:, None],
                         mask=nmask[None, :] & dmask[:, None], other=0.0)  # (D, N)
            if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
                vt = vt.to(tl.float32)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
                dp = tl.dot(do, vt, input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
                dp = tl.dot(do, vt)
            keep = nmask[None, :] & mmask[:, None]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(keep, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
            ds = p * (dp - delta[:, None])
            if IEEE:
                dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
            else:
                dq += tl.dot(ds.to(k.dtype), k)
        tl.store(dq_ptr + tl.cast(bh, tl.int64) * T * D + offs_m[:, None] * D + offs_d[None, :],
                 (dq * scale).to(dq_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


# ---------------------------------------------------------------- launchers

# Interpreter: one fixed tile (32 is the smallest that still crosses tile edges at T=37 and
# keeps tl.dot >= 16 on every side). GPU: autotuned over the tiles the Triton FlashAttention
# tutorial found best on H100 (fwd 128x64 / 128x128, 8 warps; bwd dk/dv 128 keys x 32 queries).
_INTERP_TILE = dict(BLOCK_M=32, BLOCK_N=32)
_FWD_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)]
_DKDV_CONFIGS = [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 4, 3)]
_DQ_CONFIGS = [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 4), (64, 32, 4, 3)]
_tuned: dict = {}


def _kernel_for(name: str, kernel, configs, on_cpu: bool):
    """The kernel to launch and the tile kwargs to pass (none when autotuned)."""
    if on_cpu:
        return kernel, dict(_INTERP_TILE, num_warps=4)
    if name not in _tuned:
        cfgs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in configs]
        _tuned[name] = triton.autotune(configs=cfgs, key=["T", "D", "G", "CAUSAL", "IEEE", "UPCAST"])(kernel)
    return _tuned[name], {}


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
    kern, kw = _kernel_for("fwd", _attn_fwd_kernel, _FWD_CONFIGS, interpreting(q))
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
    do = do.contiguous()
    delta = (o.float() * do.float()).sum(-1)  # (B, H, T): rowsum(dO * O), FlashAttention-2 eq. in Alg. 2
    dq = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, Hkv, T, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, Hkv, T, D, device=q.device, dtype=v.dtype)
    on_cpu = interpreting(q)
    common = dict(CAUSAL=causal, IEEE=q.dtype == torch.float32, UPCAST=on_cpu, BLOCK_D=max(16, next_pow2(D)))
    args = (*_strides(q, k, v), H, G, T, D, float(scale) * _LOG2E, float(scale))
    kern, kw = _kernel_for("dkdv", _attn_bwd_dkdv_kernel, _DKDV_CONFIGS, on_cpu)
    kern[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * Hkv)](q, k, v, do, lse, delta, dk, dv, *args,
                                                                  **common, **kw)
    kern, kw = _kernel_for("dq", _attn_bwd_dq_kernel, _DQ_CONFIGS, on_cpu)
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
