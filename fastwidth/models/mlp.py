"""MLP: `depth` hidden layers of `width` units, one readout (docs/design.md §1's CPU-scale model)."""
from __future__ import annotations

import math

import torch
from torch import nn

from fastwidth.models.base import WidthModel
from fastwidth.nn import MuLinear, MuReadout
from fastwidth.nn.roles import Role


class MLP(WidthModel):
    def __init__(self, in_dim: int, width: int, depth: int, num_classes: int, act: str = "relu", device=None):
        super().__init__()
        dims = [in_dim] + [width] * depth
        self.layers = nn.ModuleList(
            MuLinear(dims[i], dims[i + 1], role=Role.INPUT if i == 0 else Role.HIDDEN, device=device)
            for i in range(depth))
        # one activation module per layer so each can be hooked as a representation
        self.acts = nn.ModuleList(nn.GELU() if act == "gelu" else nn.ReLU() for _ in range(depth))
        self.readout = MuReadout(width, num_classes, device=device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], -1)  # (B, in_dim): images are flattened
        for lin, act in zip(self.layers, self.acts):
            h = act(lin(h))
        return h

    def feature_points(self):
        return {f"layer{i}": a for i, a in enumerate(self.acts)}

    def preact_points(self):
        return {f"layer{i}": lin for i, lin in enumerate(self.layers)}


def build(cfg, io, device=None) -> MLP:
    act = "relu" if cfg.model.act == "auto" else cfg.model.act
    in_dim = int(math.prod(io.in_shape))
    return MLP(in_dim, cfg.model.width, cfg.model.depth, io.num_classes, act=act, device=device)
