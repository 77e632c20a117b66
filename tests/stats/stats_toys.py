"""Hand-made models with the interface the statistics use (features, readout, preact/feature points)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ToyMLP(nn.Module):
    """x (B, d) -> logits (B, C); hidden tanh layers of `width` units; 1/width readout like µP."""

    def __init__(self, d: int, width: int, classes: int, depth: int = 2, seed: int = 0, act=nn.Tanh):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dims = [d] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(depth))
        self.acts = nn.ModuleList(act() for _ in range(depth))
        self.readout = nn.Linear(width, classes)
        with torch.no_grad():
            for lin in list(self.layers) + [self.readout]:
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features ** 0.5)
                lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g))

    def features(self, x):
        h = x
        for lin, act in zip(self.layers, self.acts):
            h = act(lin(h))
        return h

    def forward(self, x):
        return self.readout(self.features(x))

    def loss(self, x, y):
        return F.cross_entropy(self(x), y)

    def feature_points(self):
        return {f"layer{i}": a for i, a in enumerate(self.acts)}

    def preact_points(self):
        return {f"layer{i}": lin for i, lin in enumerate(self.layers)}


class ToyLM(nn.Module):
    """x (B, T) int -> logits (B, T, V): embedding, causal running mean, one tanh layer."""

    def __init__(self, vocab: int, width: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.act = nn.Tanh()
        self.readout = nn.Linear(width, vocab)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(self.emb.weight.shape, generator=g))
            self.mix.weight.copy_(torch.randn(self.mix.weight.shape, generator=g) / width ** 0.5)
            self.readout.weight.copy_(torch.randn(self.readout.weight.shape, generator=g) / width)

    def features(self, x):
        e = self.emb(x)                                                  # (B, T, N)
        c = e.cumsum(1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1)
        return self.act(self.mix(c))

    def forward(self, x):
        return self.readout(self.features(x))

    def loss(self, x, y):
        z = self(x)
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))

    def feature_points(self):
        return {"mix": self.act}

    def preact_points(self):
        return {"mix": self.mix}


class Member:
    def __init__(self, width, seed, model, lr=0.05):
        self.width, self.seed, self.model = width, seed, model
        self.name = f"w{width}_s{seed}"
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        self.table = {}
        self.step = 0


class ListWriter:
    def __init__(self):
        self.rows = []

    def write(self, row):
        import json
        json.dumps(row, allow_nan=False)  # rows must be strict JSON
        self.rows.append(row)


def teacher_data(n, d=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    return x, (x @ w).argmax(-1)
