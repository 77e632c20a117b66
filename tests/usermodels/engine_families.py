"""Users' module families for the engine, resume and export tests: importable, so a launched rank
(model.factory "tests.usermodels.engine_families:make_...") builds them again.

- make_tiny_lm(width): a small transformer-ish LM on bytes (vocab 256): embedding, a
  ModuleList of pre-norm blocks nested one level down (`body.layers`, so the blocks are not a
  child of the root), rotary positions from a non-persistent buffer (a RoPE table the
  constructor computes, which to_empty leaves as garbage), an untied bias-free readout.
- make_mlp(width): a plain MLP on data.in_dim = 32 inputs and 10 classes (synthetic source).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, HEAD_DIM = 256, 16, 8
IN_DIM, CLASSES = 32, 10


def rope_table(seq: int, dim: int) -> torch.Tensor:
    """(seq, dim) cos|sin of the rotary angles θ_i = 10000^(-2i/dim) × position."""
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ang = torch.outer(torch.arange(seq, dtype=torch.float32), inv)       # (T, dim/2)
    return torch.cat([ang.cos(), ang.sin()], dim=-1)                       # (T, dim)


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    T, half = x.shape[-2], x.shape[-1] // 2
    cos, sin = table[:T, :half], table[:T, half:]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.heads = width // HEAD_DIM
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, HEAD_DIM).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        q, k = rotate(q, table), rotate(k, table)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / HEAD_DIM)  # µP: 1/d
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class Body(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.register_buffer("rope", rope_table(SEQ, HEAD_DIM), persistent=False)

    def forward(self, x):
        for block in self.layers:
            x = block(x, self.rope)
        return x


class TinyLM(nn.Module):
    def __init__(self, width: int, depth: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.body = Body(width, depth)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(self.embed(idx))))          # (B, T, vocab)


class MLP(nn.Module):
    def __init__(self, width: int, depth: int = 2):
        super().__init__()
        self.inp = nn.Linear(IN_DIM, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x.flatten(1)))
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.out(h)


def make_tiny_lm(width: int, depth: int) -> nn.Module:
    return TinyLM(width, depth)


def make_mlp(width: int) -> nn.Module:
    return MLP(width)


def hand_flops_tiny_lm(width: int, depth: int, seq: int = SEQ) -> float:
    """Training FLOPs per token written from the shapes: 3 × forward; a forward's matmuls 2 × their
    weights (qkv 3N², proj N², up/down 8N² each block; readout N·vocab) and attention's
    q kᵀ and p v 4·T·N a token (causal half not subtracted, as flops.py counts)."""
    per_block = 2 * (3 * width ** 2 + width ** 2 + 8 * width ** 2) + 4 * seq * width
    return 3.0 * (depth * per_block + 2 * width * VOCAB)


def hand_flops_mlp(width: int, depth: int = 2) -> float:
    return 3.0 * 2 * (IN_DIM * width + depth * width ** 2 + width * CLASSES)
