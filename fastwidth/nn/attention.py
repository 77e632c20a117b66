"""Causal self-attention with RoPE; the softmax scale is passed explicitly to the kernel dispatch.

µP sets scale = attn_mult / head_dim (fastwidth.param.scaling.attention_scale); every backend
of fastwidth.kernels.attention.attention receives it, none assumes 1/√head_dim.
"""
from __future__ import annotations

import torch
from torch import nn

from fastwidth.kernels.attention import attention
from fastwidth.kernels.rope import rope
from fastwidth.nn.layers import MuLinear


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
    def __init__(self, width: int, n_heads: int, scale: float, *, bias: bool = False, device=None):
        super().__init__()
        assert width % n_heads == 0, (width, n_heads)
        self.n_heads, self.head_dim, self.scale = n_heads, width // n_heads, scale
        self.q = MuLinear(width, width, bias=bias, query=True, device=device)
        self.k = MuLinear(width, width, bias=bias, device=device)
        self.v = MuLinear(width, width, bias=bias, device=device)
        self.o = MuLinear(width, width, bias=bias, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H, D = self.n_heads, self.head_dim
        q = self.q(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k(x).view(B, T, H, D).transpose(1, 2)
        v = self.v(x).view(B, T, H, D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attention(q, k, v, scale=self.scale, causal=True)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.o(y)
