"""Causal self-attention with RoPE, grouped-query heads and QK-norm; the softmax scale is passed
explicitly to the kernel dispatch.

µP sets scale = attn_mult / head_dim (fastwidth.param.scaling.attention_scale); every backend
of fastwidth.kernels.attention.attention receives it, none assumes 1/√head_dim.
"""
from __future__ import annotations

import torch
from torch import nn

from fastwidth.kernels.attention import attention
from fastwidth.kernels.rope import rope
from fastwidth.nn.layers import MuLinear, Norm
from fastwidth.nn.roles import Role


def rope_tables(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim/2) for rotary embeddings (Su et al. 2021)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv)  # (T, hd/2)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated pairwise (x[..., :D/2], x[..., D/2:]): fastwidth.kernels.rope."""
    return rope(x, cos, sin)


class Attention(nn.Module):
    """Causal self-attention: n_heads query heads, n_kv_heads key/value heads (grouped-query
    attention: query head h reads kv head h // (n_heads / n_kv_heads); None = n_heads), and with
    qk_norm each head's q and k RMS-normalized over head_dim before RoPE (Qwen3's and OLMo-2's
    QK-norm, as Qwen3: one learned head_dim gain for q and one for k, shared across heads).
    The softmax scale stays `scale` (µP: attn_mult / head_dim) with or without QK-norm.
    `head_dim_grows`: head_dim scales with width (fixed n_heads), so the QK-norm gains are
    vector-like in µP (role VECTOR); at fixed head_dim they have no width dimension (FIXED)."""

    def __init__(self, width: int, n_heads: int, scale: float, *, n_kv_heads: int | None = None,
                 qk_norm: bool = False, head_dim_grows: bool = False, bias: bool = False, device=None):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        assert width % n_heads == 0 and n_heads % n_kv_heads == 0, (width, n_heads, n_kv_heads)
        self.n_heads, self.n_kv_heads, self.head_dim, self.scale = n_heads, n_kv_heads, width // n_heads, scale
        kv_width = n_kv_heads * self.head_dim
        self.q = MuLinear(width, width, bias=bias, query=True, device=device)
        self.k = MuLinear(width, kv_width, bias=bias, device=device)
        self.v = MuLinear(width, kv_width, bias=bias, device=device)
        self.o = MuLinear(width, width, bias=bias, device=device)
        role = Role.VECTOR if head_dim_grows else Role.FIXED
        self.q_norm = Norm(self.head_dim, "rms", device=device, role=role) if qk_norm else None
        self.k_norm = Norm(self.head_dim, "rms", device=device, role=role) if qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q(x).view(B, T, H, D)
        k = self.k(x).view(B, T, Hkv, D)
        v = self.v(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        if self.q_norm is not None:  # over head_dim, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attention(q, k, v, scale=self.scale, causal=True)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.o(y)
