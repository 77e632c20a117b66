"""Hand-made models with the interface the statistics use (features, readout, preact/feature points)."""
from __future__ import annotations

import math

import numpy as np
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


# V_N of three outputs (tests/stats/test_outputs.py, tests/report/test_outputs_report.py)
WIDTHS = (32, 64, 128, 256)
SEEDS = list(range(6))


def shifted_logit_family(shift=0.0, var_scale=0.5, points=300, classes=7, seed=0, keep_logits=True, centered=True):
    """{width: [signature per seed]}: logits = F + sqrt(var_scale/N)·ε + c(seed)·1, c ~ N(0, shift²):
    the seed noise has V_N = var_scale/N; the shift moves every logit of a seed together."""
    rng = np.random.default_rng(seed)
    base = torch.tensor(3 * rng.standard_normal((points, classes)))
    y = torch.tensor(rng.integers(0, classes, points))
    sigs = {}
    for w in WIDTHS:
        sigs[w] = []
        for _ in SEEDS:
            z = base + math.sqrt(var_scale / w) * torch.tensor(rng.standard_normal((points, classes)))
            z = (z + shift * rng.standard_normal()).float()
            true = z.gather(1, y[:, None]).squeeze(1)
            sig = {"true_logit": true, "loss": torch.logsumexp(z, -1) - true}
            if centered:
                sig["centered_true_logit"] = true - z.mean(-1)
            if keep_logits:
                sig["logits"] = z
            sigs[w].append(sig)
    return sigs
