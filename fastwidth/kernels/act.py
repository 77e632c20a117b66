"""Activations: GELU (tanh approximation, as GPT-2) and SwiGLU, forward and backward.

GELU here is always the tanh approximation, F.gelu(x, approximate="tanh"): it is what GPT-2
and nanoGPT use, and the Triton kernel builds tanh from exp (libdevice tanh/erf do not run in
the interpreter). Kernels compute in fp32 and store in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastwidth.kernels import dispatch
from fastwidth.kernels._triton import HAS_TRITON, AotConfig, gelu_tanh_inner, jit, tl, triton

# ---------------------------------------------------------------- torch reference


def gelu_ref(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


# ---------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @jit
    def _offsets(BLOCK: tl.constexpr):
        # 64-bit: program_id * BLOCK is int32 and wraps at 2^31 elements (an FFN of 65,536 at
        # 32k tokens a micro-batch), which would read and write far outside the tensor
        return tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)

    @jit
    def _gelu_fwd_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = _offsets(BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        t = gelu_tanh_inner(x)
        y = 0.5 * x * (1.0 + t)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @jit
    def _gelu_bwd_kernel(dy_ptr, x_ptr, dx_ptr, n, BLOCK: tl.constexpr):
        offs = _offsets(BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        t = gelu_tanh_inner(x)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        dx = dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    @jit
    def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = _offsets(BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @jit
    def _swiglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
        offs = _offsets(BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        silu = g * sig
        dg = dy * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + offs, (dy * silu).to(du_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launchers

# 1024 elements a program: elementwise ops are bandwidth-bound, and 1024 x 4 warps keeps
# 8 elements a thread in flight (Triton tutorial 01 uses the same size on A100/H100).
BLOCK = 1024
NUM_WARPS = 4

# What `python -m fastwidth.kernels.aot` compiles: every kernel at the launch config, in both
# dtypes; n as a 64-bit integer, which is what a launch of 2^31 elements or more passes.
AOT_KERNELS = [AotConfig(fn, dtype, dict(BLOCK=BLOCK), NUM_WARPS, scalar_types={"n": "i64"})
               for fn in (_gelu_fwd_kernel, _gelu_bwd_kernel, _swiglu_fwd_kernel, _swiglu_bwd_kernel)
               for dtype in ("bf16", "fp32")] if HAS_TRITON else []


def _launch(kernel, n: int, *tensors: Tensor) -> None:
    kernel[(triton.cdiv(n, BLOCK),)](*tensors, n, BLOCK=BLOCK, num_warps=NUM_WARPS)


def _gelu_fwd_launch(x: Tensor) -> Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    _launch(_gelu_fwd_kernel, x.numel(), x, y)
    return y


def _gelu_bwd_launch(dy: Tensor, x: Tensor) -> Tensor:
    dy, x = dy.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    _launch(_gelu_bwd_kernel, x.numel(), dy, x, dx)
    return dx


def _swiglu_fwd_launch(g: Tensor, u: Tensor) -> Tensor:
    g, u = g.contiguous(), u.contiguous()
    y = torch.empty_like(g)
    _launch(_swiglu_fwd_kernel, g.numel(), g, u, y)
    return y


def _swiglu_bwd_launch(dy: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    dy, g, u = dy.contiguous(), g.contiguous(), u.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    _launch(_swiglu_bwd_kernel, g.numel(), dy, g, u, dg, du)
    return dg, du


# ---------------------------------------------------------------- registered ops + autograd


@torch.library.custom_op("fastwidth::gelu_fwd", mutates_args=())
def _gelu_fwd_op(x: Tensor) -> Tensor:
    return _gelu_fwd_launch(x)


@_gelu_fwd_op.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("fastwidth::gelu_bwd", mutates_args=())
def _gelu_bwd_op(dy: Tensor, x: Tensor) -> Tensor:
    return _gelu_bwd_launch(dy, x)


@_gelu_bwd_op.register_fake
def _(dy, x):
    return torch.empty_like(x)


def _gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _gelu_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _gelu_bwd_op(dy, x)


_gelu_fwd_op.register_autograd(_gelu_backward, setup_context=_gelu_setup)


@torch.library.custom_op("fastwidth::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate: Tensor, up: Tensor) -> Tensor:
    return _swiglu_fwd_launch(gate, up)


@_swiglu_fwd_op.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@torch.library.custom_op("fastwidth::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return _swiglu_bwd_launch(dy, gate, up)


@_swiglu_bwd_op.register_fake
def _(dy, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return _swiglu_bwd_op(dy, gate, up)


_swiglu_fwd_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


# ---------------------------------------------------------------- functional


def gelu(x: Tensor, backend: str | None = None) -> Tensor:
    """GELU with the tanh approximation. Inputs: x any shape. Outputs: same shape and dtype."""
    if dispatch.resolve(backend, x) == "triton":
        return _gelu_fwd_op(x)
    return gelu_ref(x)


def swiglu(gate: Tensor, up: Tensor, backend: str | None = None) -> Tensor:
    """silu(gate) * up. Inputs: gate, up of one shape and dtype. Outputs: that shape and dtype."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if dispatch.resolve(backend, gate) == "triton":
        return _swiglu_fwd_op(gate, up)
    return swiglu_ref(gate, up)
