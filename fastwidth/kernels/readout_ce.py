"""The µP readout fused with cross-entropy: logits = (h @ W.T) * multiplier + bias, then CE.

Never holds the tokens x vocab logits in fp32 (the eager path holds them in the input dtype,
again in fp32 for log_softmax, and a third time as their gradient). The Triton path walks the
rows in chunks: one vendor GEMM (addmm, alpha = multiplier, bias fused) gives a chunk's logits
in the input dtype; a Triton kernel runs along each row with an online logsumexp over vocabulary
blocks, writes the per-token loss, logsumexp, true-class logit and argmax, and overwrites the
logits with dloss/dlogits in place; two more GEMMs turn that into dh and dW. So the gradients
are computed during the forward (as Liger-Kernel's fused linear CE does) and the backward only
scales them by the upstream gradient: three GEMMs in all, as eager, with one chunk of logits
alive instead of three copies of all of them.

Per token: loss = lse - (1 - eps) * z_y - eps * mean_j z_j + z_loss * lse^2
(eps = label smoothing, as F.cross_entropy(label_smoothing=eps); z_loss as PaLM). Tokens whose
target is ignore_index count for nothing and have loss 0 and true logit 0.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastwidth.errors import UserError
from fastwidth.kernels import dispatch, native
from fastwidth.kernels._triton import HAS_TRITON, AotConfig, interpreting, jit, next_pow2, tl
from fastwidth.kernels.amp import autocast_off, cast_for_autocast


class ReadoutCE(NamedTuple):
    loss: Tensor        # scalar, differentiable: mean (or sum) over counted tokens
    token_loss: Tensor  # target.shape, fp32, no grad
    lse: Tensor         # target.shape, fp32 logsumexp of the logits
    true_logit: Tensor  # target.shape, fp32 logit of the target class (0 where ignored)
    argmax: Tensor      # target.shape, int64


# ---------------------------------------------------------------- torch reference


def readout_logits(h2: Tensor, weight: Tensor, multiplier: float, bias: Optional[Tensor],
                   out: Optional[Tensor] = None) -> Tensor:
    """(M, N) x (V, N) -> (M, V) in h's dtype: one addmm, alpha carrying the µP multiplier.
    out: an (M, V) buffer to write into (any row stride); beta=0 ignores what it held (NaN included)."""
    if bias is None:
        base = h2.new_zeros(()) if out is None else out
        return torch.addmm(base, h2, weight.t(), beta=0, alpha=multiplier, out=out)
    return torch.addmm(bias, h2, weight.t(), alpha=multiplier, out=out)


def readout_ce_ref(h: Tensor, weight: Tensor, target: Tensor, multiplier: float = 1.0,
                   bias: Optional[Tensor] = None, z_loss: float = 0.0, label_smoothing: float = 0.0,
                   ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token (loss, lse, true_logit, argmax), flattened; loss differentiable, fp32 (fp64 in)."""
    N = h.shape[-1]
    h2, t = h.reshape(-1, N), target.reshape(-1)
    z = readout_logits(h2, weight, multiplier, bias)  # (M, V)
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # fp32 (fp64 for an fp64 reference)
    lse = torch.logsumexp(z, dim=-1)
    valid = t != ignore_index
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    zy = z.gather(1, t_safe[:, None]).squeeze(1)
    loss = lse - (1.0 - label_smoothing) * zy - label_smoothing * z.mean(-1) + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    zy = torch.where(valid, zy, torch.zeros_like(zy))
    return loss, lse.detach(), zy.detach(), z.detach().argmax(-1)


# ---------------------------------------------------------------- Triton kernel

if HAS_TRITON:

    @jit
    def _ce_rows_kernel(z_ptr, stride_z, t_ptr, loss_ptr, lse_ptr, zy_ptr, am_ptr, V, z_coef, eps,
                        ignore_index, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        # One program per row of a logits chunk; z is read in the input dtype, reduced in fp32.
        row = tl.cast(tl.program_id(0), tl.int64)
        zrow = z_ptr + row * stride_z
        y = tl.load(t_ptr + row)
        valid = y != ignore_index
        y = tl.where(valid, y, 0)
        m = tl.cast(float("-inf"), tl.float32)
        s = tl.cast(0.0, tl.float32)
        zsum = tl.cast(0.0, tl.float32)
        best_i = tl.cast(0, tl.int64)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(zrow + cols, mask=mask, other=float("-inf")).to(tl.float32)
            bm = tl.max(z, axis=0)
            bi = tl.argmax(z, axis=0)
            # strict >: ties keep the earlier block, so the first maximal index wins (torch's rule)
            best_i = tl.where(bm > m, tl.cast(v0 + bi, tl.int64), best_i)
            new_m = tl.maximum(m, bm)
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)
            m = new_m
            zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        lse = m + tl.log(s)
        zy = tl.load(zrow + y).to(tl.float32)
        loss = lse - (1.0 - eps) * zy - eps * zsum / V + z_coef * lse * lse
        tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
        tl.store(lse_ptr + row, lse)
        tl.store(zy_ptr + row, tl.where(valid, zy, 0.0))
        tl.store(am_ptr + row, best_i)
        if COMPUTE_GRAD:
            # dloss/dz_j = p_j (1 + 2 z_coef lse) - eps/V - (1 - eps) [j == y], 0 for ignored rows
            gscale = tl.where(valid, 1.0, 0.0)
            pscale = 1.0 + 2.0 * z_coef * lse
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                mask = cols < V
                z = tl.load(zrow + cols, mask=mask, other=0.0).to(tl.float32)
                dz = tl.exp(z - lse) * pscale - eps / V - tl.where(cols == y, 1.0 - eps, 0.0)
                tl.store(zrow + cols, (dz * gscale).to(z_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launcher

# Rows a chunk. None: chosen by _chunk_rows. Tests set a small value to cross chunk edges.
CHUNK_ROWS: Optional[int] = None
# Vocabulary columns a step along a row on a GPU: a 50k vocabulary in 13 blocks, 16 fp32 values
# a thread at 8 warps (narrower vocabularies take the next power of two above theirs). 64 in the
# interpreter, so that small test vocabularies still cross block edges.
BLOCK_V = 4096
NUM_WARPS = 8
INTERP_BLOCK_V = 64

# What `python -m fastwidth.kernels.aot` compiles: the GPU block, with and without the gradient
# pass, in both dtypes of the logits; targets and argmax are int64, the per-row statistics fp32.
AOT_KERNELS = [AotConfig(_ce_rows_kernel, dtype, dict(COMPUTE_GRAD=grad, BLOCK_V=BLOCK_V), NUM_WARPS,
                         ptr_types={"t_ptr": "i64", "am_ptr": "i64", "loss_ptr": "fp32", "lse_ptr": "fp32",
                                    "zy_ptr": "fp32"},
                         scalar_types={"z_coef": "fp32", "eps": "fp32"})
               for dtype in ("bf16", "fp32") for grad in (True, False)] if HAS_TRITON else []


def _chunk_rows(M: int, N: int, V: int, interp: bool) -> int:
    if CHUNK_ROWS is not None:
        return CHUNK_ROWS
    if interp:
        return M
    # A chunk's logits about 4x the size of h itself (Liger picks 1x), at least 1024 rows so
    # each of the three GEMMs stays large enough to run near peak on an H100/H200.
    return max(1024, next_pow2(triton_cdiv(4 * M * N, V)))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def logits_buffer(rows: int, V: int, like: Tensor) -> Tensor:
    """An uninitialized (rows, V) view of a (rows, V rounded up to 8) buffer in like's dtype: with a
    vocabulary that is not a multiple of 8 (GPT-2's 50,257) every row still starts 16-byte aligned,
    which cuBLAS's fast GEMM paths and the kernel's vector loads need. The padding columns are
    zeroed: the CPU's bf16 GEMM (oneDNN on AMX, torch 2.13) reads a strided operand's row past its
    last column, so a NaN left there by the allocator poisons whole rows of z @ W (the backward's dh)."""
    padded = -(-V // 8) * 8
    buf = torch.empty(rows, padded, device=like.device, dtype=like.dtype)
    if padded > V:
        buf[:, V:].zero_()
    return buf[:, :V]


def accumulate_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b in place, acc fp32, a and b fp32 or half precision: one GEMM with fp32
    accumulation and no (V, N) product temporary (cuBLAS out_dtype, as Liger-Kernel since its
    issue 1232). The CPU has no aten::addmm.dtype; there (the interpreter's test path) the
    operands are upcast first, which costs temporaries but gives the same fp32 sum."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _readout_ce_launch(h2, weight, bias, target, multiplier, z_loss, label_smoothing, ignore_index, compute_grad):
    M, N = h2.shape
    V = weight.shape[0]
    dev = h2.device
    token_loss, lse, zy = (torch.empty(M, device=dev, dtype=torch.float32) for _ in range(3))
    argmax = torch.empty(M, device=dev, dtype=torch.int64)
    interp = interpreting(h2)
    if compute_grad:
        dh = torch.empty_like(h2)
        dw = torch.zeros(V, N, device=dev, dtype=torch.float32)
        db = torch.zeros(V, device=dev, dtype=torch.float32) if bias is not None else None
    block_v = min(INTERP_BLOCK_V if interp else BLOCK_V, next_pow2(V))
    chunk = _chunk_rows(M, N, V, interp)
    zbuf = logits_buffer(min(chunk, M), V, h2)  # one chunk of logits, reused by every chunk
    for a in range(0, M, chunk):
        b = min(M, a + chunk)
        hc = h2[a:b]
        z = readout_logits(hc, weight, multiplier, bias, out=zbuf[:b - a])  # (rows, V), input dtype
        _ce_rows_kernel[(b - a,)](z, z.stride(0), target[a:b], token_loss[a:b], lse[a:b], zy[a:b], argmax[a:b],
                                  V, float(z_loss), float(label_smoothing), int(ignore_index),
                                  COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=NUM_WARPS)
        if compute_grad:  # z now holds dloss/dlogits
            torch.mm(z, weight, out=dh[a:b])
            accumulate_fp32(dw, z.t(), hc)
            if db is not None:
                db += z.sum(0, dtype=torch.float32)
    total = token_loss.sum()
    if not compute_grad:
        e = h2.new_empty(0)
        return total, token_loss, lse, zy, argmax, e, e.clone(), e.clone()
    dh.mul_(multiplier)
    dw = dw.mul_(multiplier).to(weight.dtype)
    db = db.to(bias.dtype) if bias is not None else h2.new_empty(0)
    return total, token_loss, lse, zy, argmax, dh, dw, db


# ---------------------------------------------------------------- registered op + autograd


@torch.library.custom_op("fastwidth::readout_ce_fwd", mutates_args=())
def _readout_ce_op(h2: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, multiplier: float,
                   z_loss: float, label_smoothing: float, ignore_index: int, compute_grad: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(h2):  # the functional chose the dtypes; out= GEMMs must keep them
        return _readout_ce_launch(h2, weight, bias, target, multiplier, z_loss, label_smoothing, ignore_index,
                                  compute_grad)


@_readout_ce_op.register_fake
def _(h2, weight, bias, target, multiplier, z_loss, label_smoothing, ignore_index, compute_grad):
    M = h2.shape[0]
    f = h2.new_empty(M, dtype=torch.float32)
    stats = (h2.new_empty((), dtype=torch.float32), f, torch.empty_like(f), torch.empty_like(f),
             h2.new_empty(M, dtype=torch.int64))
    if not compute_grad:
        return stats + (h2.new_empty(0), h2.new_empty(0), h2.new_empty(0))
    db = torch.empty_like(bias) if bias is not None else h2.new_empty(0)
    return stats + (torch.empty_like(h2), torch.empty_like(weight), db)


def _ce_setup(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.compute_grad = inputs[8]
    ctx.mark_non_differentiable(*output[1:5])
    ctx.save_for_backward(*output[5:])


def _ce_backward(ctx, dtotal, *_unused):
    # The forward computed d(sum of token losses)/d(inputs); only that sum is differentiable,
    # so the upstream gradient is one scalar.
    if not ctx.compute_grad:
        raise RuntimeError("readout_ce: backward through a forward that ran without compute_grad")
    dh, dw, db = ctx.saved_tensors
    return (dh * dtotal.to(dh.dtype), dw * dtotal.to(dw.dtype), db * dtotal.to(db.dtype) if ctx.has_bias else None,
            None, None, None, None, None, None)


_readout_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup)


def _register_native() -> None:
    """The native readout + CE's fake (the Triton op's: one statement of the shapes) and autograd."""
    lib = "fastwidth_native::"

    @torch.library.register_fake(lib + "readout_ce")
    def _(h2, weight, bias, target, multiplier, z_loss, label_smoothing, ignore_index, compute_grad, chunk_rows):
        return _readout_ce_op(h2, weight, bias, target, multiplier, z_loss, label_smoothing, ignore_index,
                              compute_grad)

    def backward(ctx, dtotal, *unused):
        return _ce_backward(ctx, dtotal, *unused) + (None,)  # chunk_rows

    torch.library.register_autograd(lib + "readout_ce", backward, setup_context=_ce_setup)


native.register_python_side(_register_native)


# ---------------------------------------------------------------- functional


def readout_ce_stats(h: Tensor, weight: Tensor, target: Tensor, *, multiplier: float = 1.0,
                     bias: Optional[Tensor] = None, z_loss: float = 0.0, label_smoothing: float = 0.0,
                     ignore_index: int = -100, reduction: str = "mean", backend: str | None = None) -> ReadoutCE:
    """Readout + cross-entropy with per-token statistics.

    Inputs: h (..., N); weight (V, N); target (...) int64 (ignore_index skipped); multiplier
    (the µP output multiplier); bias (V,) or None; reduction "mean" (over counted tokens) or "sum".
    Outputs: ReadoutCE(loss, token_loss, lse, true_logit, argmax), per-token fields of target's shape.
    """
    if h.shape[:-1] != target.shape or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"readout_ce: h {tuple(h.shape)}, weight {tuple(weight.shape)}, "
                         f"target {tuple(target.shape)} do not fit (h (..., N), weight (V, N), target (...))")
    if reduction not in ("mean", "sum"):
        raise UserError(f"readout_ce: reduction {reduction!r} is not one of mean, sum")
    N = h.shape[-1]
    t = target.reshape(-1)
    name = dispatch.resolve(backend, h)
    if name == "native":
        total, tok, lse, zy, am = native.readout_ce(h, weight, bias, t, multiplier, z_loss, label_smoothing,
                                                    ignore_index, CHUNK_ROWS)
    elif name == "triton":
        needs = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, weight, bias))
        # the GEMMs run in autocast's dtype when it is on, else in h's, as the aten addmm would;
        # the casts are differentiable, so dW/db come back in the parameters' dtype
        h2, weight, bias = cast_for_autocast(h.reshape(-1, N), weight, bias)
        h2 = h2.contiguous()
        weight = weight.to(h2.dtype)
        bias = bias.to(h2.dtype) if bias is not None else None
        total, tok, lse, zy, am, *_ = _readout_ce_op(h2, weight.contiguous(), bias, t.contiguous(),
                                                     float(multiplier), float(z_loss), float(label_smoothing),
                                                     int(ignore_index), needs)
    else:
        tok, lse, zy, am = readout_ce_ref(h, weight, target, multiplier, bias, z_loss, label_smoothing,
                                          ignore_index)
        total = tok.sum()
    if reduction == "mean":
        total = total / (t != ignore_index).sum().clamp(min=1)
    shape = target.shape
    return ReadoutCE(total, tok.detach().view(shape), lse.view(shape), zy.view(shape), am.view(shape))


def readout_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, *, multiplier: float = 1.0,
                          bias: Optional[Tensor] = None, backend: str | None = None, z_loss: float = 0.0,
                          label_smoothing: float = 0.0, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of logits = (h @ weight.T) * multiplier + bias over non-ignored tokens."""
    return readout_ce_stats(h, weight, target, multiplier=multiplier, bias=bias, z_loss=z_loss,
                            label_smoothing=label_smoothing, ignore_index=ignore_index, backend=backend).loss
