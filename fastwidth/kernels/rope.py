"""Rotary position embedding (Su et al. 2021) of queries and keys: pairs (x[..., j], x[..., j + D/2])
rotated by the angle t * inv_freq_j of their position t.

x is (B, H, T, D) (any strides: the attention's q and k are transposed views of one linear's
output); cos and sin are (>= T, D/2) fp32 tables (fastwidth.nn.attention.rope_tables). The torch
reference computes in x's dtype; the native op (csrc/rope.cpp) reads x once, computes in fp32 and
writes a contiguous result, its backward the rotation by minus the angle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastwidth.kernels import dispatch, native

# ---------------------------------------------------------------- torch reference


def rope_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    T = x.shape[-2]
    c, s = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


# ---------------------------------------------------------------- the native op's fake + autograd


def _native_setup(ctx, inputs, output):
    _, cos, sin, inverse = inputs
    ctx.inverse = inverse
    ctx.save_for_backward(cos, sin)


def _native_backward(ctx, dy):
    # the rotation is orthogonal: its transpose is the rotation by the opposite angle
    cos, sin = ctx.saved_tensors
    return torch.ops.fastwidth_native.rope(dy, cos, sin, not ctx.inverse), None, None, None


def _register_native() -> None:
    lib = "fastwidth_native::"

    @torch.library.register_fake(lib + "rope")
    def _(x, cos, sin, inverse):
        return x.new_empty(x.shape)

    torch.library.register_autograd(lib + "rope", _native_backward, setup_context=_native_setup)


native.register_python_side(_register_native)


# ---------------------------------------------------------------- functional


def rope(x: Tensor, cos: Tensor, sin: Tensor, backend: str | None = None) -> Tensor:
    """x (B, H, T, D) rotated by its positions' angles; differentiable in x. Outputs x's shape, dtype."""
    if x.dim() != 4 or x.shape[-1] % 2 or cos.shape != sin.shape or cos.shape[-1] * 2 != x.shape[-1] \
            or cos.shape[0] < x.shape[-2]:
        raise ValueError(f"rope: x {tuple(x.shape)} must be (B, H, T, D), D even, with cos/sin "
                         f"(>= T, D/2), got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if dispatch.resolve(backend, x) == "native":
        return native.load().rope(x, cos, sin, False)
    return rope_ref(x, cos, sin)
