"""Thin µP-aware layers. Each declares its parameters' roles when built (`mup_roles`) and holds
one plain float `mult`, its forward multiplier, set from the side table by
`fastwidth.param.scaling.apply_forward_mults`. The math lives in fastwidth.kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastwidth.kernels.linear import linear
from fastwidth.kernels.norm import layer_norm, layer_norm_residual, rms_norm, rms_norm_residual
from fastwidth.nn.roles import Init, Role


class MuLinear(nn.Module):
    """y = branch · (mult · (x Wᵀ) + b) (mult does not scale the bias; branch, 1 but at the end of a
    residual branch under the depth kinds, scales both): fastwidth.kernels.linear, the vendor GEMM
    (addmm with alpha = mult · branch) on the torch path, the fused Triton GEMM on the triton path."""

    def __init__(self, in_features: int, out_features: int, *, role: Role = Role.HIDDEN,
                 bias: bool = True, query: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.role = in_features, out_features, role
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        self._winit = Init.QUERY if query else Init.FAN_IN
        self.mult = 1.0
        # the depth kinds' m_L^-α when this layer ends a residual branch (set by its block, not by
        # the table): the whole output, bias included, × branch, folded into alpha and the bias
        self.branch = 1.0

    def mup_roles(self):
        bias_role = Role.FIXED if self.role is Role.OUTPUT else Role.VECTOR
        return {"weight": (self.role, self._winit), "bias": (bias_role, Init.BIAS)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch == 1.0:
            return linear(x, self.weight, self.bias, alpha=self.mult)
        bias = None if self.bias is None else self.bias * self.branch  # (N,): width elements, not rows × width
        return linear(x, self.weight, bias, alpha=self.mult * self.branch)

    def observed(self) -> bool:
        """True when a hook runs around this layer (statistics read its output as the
        pre-activation, ZeRO-3 gathers its weight): then it must be called, not fused past."""
        return bool(self._forward_hooks or self._forward_pre_hooks)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, role={self.role.value}, mult={self.mult:.4g}"


class MuReadout(MuLinear):
    """The readout: role OUTPUT (µP: mult = output_mult / m, zero init by default), bias FIXED."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, device=None):
        super().__init__(in_features, out_features, role=Role.OUTPUT, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the vendor GEMM on every backend: a vocabulary such as GPT-2's 50,257 is not a multiple
        # of 8, which puts the Triton GEMM on its scalar-load tile; training goes through
        # readout_ce (the logits never leave that op), this is for evaluation's logits
        return linear(x, self.weight, self.bias, alpha=self.mult, backend="torch")


class TiedReadout(nn.Module):
    """The readout of tied embeddings (model.tie_embeddings): logits = mult · h Eᵀ, E the token
    embedding's (vocab, width) matrix. One parameter, owned and named by the embedding (its µP
    row is the embedding's: init N(0, embed_std²), LR vector-like, as in mup where the shared
    matrix keeps the embedding's infshape); `mult` is the readout's forward multiplier (µP:
    output_mult / m), applied to this output use only, as mup's MuSharedReadout. No mup_roles:
    it owns nothing; its mult is set when built (fastwidth.models.gpt)."""

    bias = None

    def __init__(self, embedding: "MuEmbedding", mult: float):
        super().__init__()
        self._embedding = (embedding,)  # a tuple, not a submodule: the matrix keeps one name, embed.weight
        self.mult = mult

    @property
    def weight(self) -> nn.Parameter:
        # read at call time: FSDP2 swaps the embedding's parameter for its unsharded one around a forward
        return self._embedding[0].weight

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, None, alpha=self.mult, backend="torch")  # as MuReadout.forward

    def extra_repr(self) -> str:
        return f"tied to the embedding, mult={self.mult:.4g}"


class MuEmbedding(nn.Module):
    """Token embedding: role INPUT (fan_in is the one-hot vocabulary, fixed in width)."""

    def __init__(self, num_embeddings: int, dim: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, device=device))
        self.mult = 1.0

    def mup_roles(self):
        return {"weight": (Role.INPUT, Init.EMBED)}

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = F.embedding(idx, self.weight)
        return out if self.mult == 1.0 else out * self.mult


class MuConv2d(nn.Module):
    """Convolution without bias (a norm follows); role INPUT for the stem, HIDDEN elsewhere."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, role: Role = Role.HIDDEN, device=None):
        super().__init__()
        self.stride, self.padding, self.role = stride, kernel // 2, role
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel, device=device))
        self.mult = 1.0

    def mup_roles(self):
        return {"weight": (self.role, Init.FAN_IN)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        return y if self.mult == 1.0 else y * self.mult


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with gains and shifts as VECTOR parameters."""

    def mup_roles(self):
        return {"weight": (Role.VECTOR, Init.ONES), "bias": (Role.VECTOR, Init.ZEROS)}


class Norm(nn.Module):
    """Pre-norm for the GPT: RMSNorm (gain only) or LayerNorm (gain and shift). role VECTOR when
    dim grows with width; FIXED for one that does not (QK-norm's head_dim gain at fixed head_dim)."""

    def __init__(self, dim: int, kind: str = "rms", eps: float | None = None, device=None,
                 role: Role = Role.VECTOR):
        super().__init__()
        self.kind, self.role = kind, role
        self.eps = eps if eps is not None else (1e-6 if kind == "rms" else 1e-5)
        self.weight = nn.Parameter(torch.empty(dim, device=device))
        self.bias = nn.Parameter(torch.empty(dim, device=device)) if kind == "layer" else None

    def mup_roles(self):
        return {"weight": (self.role, Init.ONES), "bias": (self.role, Init.ZEROS)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms":
            return rms_norm(x, self.weight, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)

    def with_residual(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(s), s) for s = x + residual: the add fused into the norm's kernel."""
        if self.kind == "rms":
            y, s, _ = rms_norm_residual(x, residual, self.weight, self.eps)
        else:
            y, s, _ = layer_norm_residual(x, residual, self.weight, self.bias, self.eps)
        return y, s
