"""GPT: pre-norm decoder with RoPE, RMSNorm or LayerNorm, GELU or SwiGLU, and a µP readout;
optionally grouped-query attention (model.n_kv_heads), QK-norm (model.qk_norm) and a readout
tied to the token embedding (model.tie_embeddings).

n_heads = width / head_dim (head_dim fixed, the µP default) or fixed heads (head_dim grows);
kv heads: fastwidth.config.gpt_heads (the group size is kept across widths).
"""
from __future__ import annotations

import torch
from torch import nn

from fastwidth.kernels import dispatch
from fastwidth.kernels.act import gelu, swiglu
from fastwidth.kernels.linear import linear
from fastwidth.models.base import WidthModel
from fastwidth.config import gpt_heads
from fastwidth.nn import Attention, MuEmbedding, MuLinear, MuReadout, Norm, TiedReadout
from fastwidth.nn.attention import rope_tables
from fastwidth.nn.roles import Init, Role
from fastwidth.param.scaling import attention_scale, branch_mult, param_info


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int, act: str, bias: bool, device=None):
        super().__init__()
        self.act = act
        self.fc = MuLinear(width, hidden, bias=bias, device=device)
        self.gate = MuLinear(width, hidden, bias=bias, device=device) if act == "swiglu" else None
        self.proj = MuLinear(hidden, width, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):  # the activation in the GEMM's epilogue: no (B, T, hidden) round trip
            fc, g = self.fc, self.gate
            if g is None:
                h = linear(x, fc.weight, fc.bias, alpha=fc.mult, act="gelu")
            else:
                h = linear(x, g.weight, g.bias, alpha=g.mult, act="swiglu", weight2=fc.weight, bias2=fc.bias,
                           alpha2=fc.mult)
            return self.proj(h)
        u = self.fc(x)  # (B, T, hidden)
        h = swiglu(self.gate(x), u) if self.gate is not None else gelu(u)
        return self.proj(h)

    def _fused(self, x: torch.Tensor) -> bool:
        # the Triton path, and nothing hooked on fc/gate (a hook must see their outputs, the
        # pre-activations, or gather their weights first): then one fused launch for both
        if dispatch.resolve(None, x) != "triton":
            return False
        return not any(m.observed() for m in (self.fc, self.gate) if m is not None)


class Block(nn.Module):
    def __init__(self, width: int, n_heads: int, scale: float, cfg_model, device=None, branch: float = 1.0,
                 n_kv_heads: int = 0):
        super().__init__()
        self.branch = branch  # the depth kinds' m_L^-α on each branch's output (1.0: mup and the others)
        act = "gelu" if cfg_model.act == "auto" else cfg_model.act
        self.norm1 = Norm(width, cfg_model.norm, device=device)
        self.attn = Attention(width, n_heads, scale, n_kv_heads=n_kv_heads, qk_norm=cfg_model.qk_norm,
                              head_dim_grows=bool(cfg_model.n_heads), bias=cfg_model.bias, device=device)
        self.norm2 = Norm(width, cfg_model.norm, device=device)
        self.mlp = FeedForward(width, cfg_model.mlp_ratio * width, act, cfg_model.bias, device=device)
        # each branch ends in one linear layer (attn.o, mlp.proj): m_L^-α rides on its GEMM's alpha
        # and its bias (MuLinear.branch), on every kernel path, instead of a pass over (B, T, N)
        self.attn.o.branch = self.mlp.proj.branch = branch

    def forward(self, x, cos, sin):
        # x + attn(...) and norm2 of it in one kernel (the same sum, rounded the same way); both
        # branch outputs already carry × self.branch (attn.o and mlp.proj apply it)
        a = self.attn(self.norm1(x), cos, sin)
        y, x = self.norm2.with_residual(a, x)
        return x + self.mlp(y)


class GPT(WidthModel):
    def __init__(self, cfg, vocab_size: int, seq_len: int, device=None):
        super().__init__()
        mc = cfg.model
        n_heads, n_kv_heads = gpt_heads(mc, mc.width, cfg.param.base_width)
        self.seq_len, self.head_dim, self.rope_base = seq_len, mc.width // n_heads, mc.rope_base
        scale = attention_scale(cfg)
        self.embed = MuEmbedding(vocab_size, mc.width, device=device)
        self.blocks = nn.ModuleList(Block(mc.width, n_heads, scale, mc, device=device, branch=branch_mult(cfg),
                                          n_kv_heads=n_kv_heads)
                                    for _ in range(mc.depth))
        self.norm_f = Norm(mc.width, mc.norm, device=device)
        if mc.tie_embeddings:  # the readout's own µP row gives its forward multiplier; the matrix is the embedding's
            mult = param_info("readout.weight", (vocab_size, mc.width), Role.OUTPUT, Init.FAN_IN, cfg).forward_mult
            self.readout = TiedReadout(self.embed, mult)
        else:
            self.readout = MuReadout(mc.width, vocab_size, bias=False, device=device)
        cos, sin = rope_tables(seq_len, self.head_dim, mc.rope_base, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_buffers(self) -> None:
        cos, sin = rope_tables(self.seq_len, self.head_dim, self.rope_base, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's {self.seq_len}")
        x = self.embed(idx)  # (B, T, N)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        return self.norm_f(x)

    def branch_prefixes(self):
        return ("blocks.",)

    def feature_points(self):
        return {f"block{i}": b for i, b in enumerate(self.blocks)}

    def preact_points(self):
        pts = {}
        for i, b in enumerate(self.blocks):
            pts[f"block{i}.attn_q"] = b.attn.q
            pts[f"block{i}.mlp_fc"] = b.mlp.fc
        return pts


def build(cfg, io, device=None) -> GPT:
    return GPT(cfg, io.vocab_size, io.seq_len, device=device)
