"""Module families for the model.arch=python tests: factories make(width) -> nn.Module, importable
as tests.usermodels.families:NAME (model.factory) from the repository root.

Good ones (their roles are checked against microsoft/mup in test_roles.py):
    branchy      two parallel branches summed, a LayerNorm, a bias-free readout (classes data)
    conv_embed   an nn.Embedding input, a Conv1d over the sequence, a bias-free readout (tokens)
    rounded      an MLP whose intermediate size is rounded up to a multiple of 8 per width, so its
                 matrices' width multipliers differ from width / base_width
    gpt_demo     fastwidth's own GPT at the demo config's width and data (model.arch gpt's twin)
    mup_mlp      an MLP prepared with microsoft/mup (MuReadout, set_base_shapes against width 16)
Refused ones (test_roles.py's refusal lines): bad_ratio, no_readout, unknown_vector, not_a_module.
"""
import math

import torch
from torch import nn

IN, CLASSES, VOCAB = 12, 5, 17


class Branchy(nn.Module):
    def __init__(self, width: int, in_features: int = IN, classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.left = nn.Linear(width, width)
        self.right = nn.Sequential(nn.Linear(width, width, bias=False), nn.Tanh(), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes, bias=False)

    def forward(self, x):
        h = torch.relu(self.stem(x.flatten(1)))
        h = h + torch.relu(self.left(h)) + self.right(h)
        return self.head(self.norm(h))


class ConvEmbed(nn.Module):
    def __init__(self, width: int, vocab: int = VOCAB):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        h = self.embed(idx).transpose(1, 2)             # (B, N, T)
        h = torch.relu(self.conv(h)).transpose(1, 2)     # (B, T, N)
        return self.head(self.norm(h))


def inter_size(width: int) -> int:
    """8/3 × width rounded up to a multiple of 8 (Llama's rule): 64 at 24 and 128 at 48 (ratio 2,
    as width's), 112 at 40 (×1.75 while width is ×1.67)."""
    return 8 * math.ceil(8 * width / 3 / 8)


class Rounded(nn.Module):
    def __init__(self, width: int, in_features: int = IN, classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.fc = nn.Linear(width, inter_size(width))
        self.proj = nn.Linear(inter_size(width), width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.relu(self.stem(x.flatten(1)))
        h = h + self.proj(torch.relu(self.fc(h)))
        return self.head(h)


def branchy(width):
    return Branchy(width)


def conv_embed(width):
    return ConvEmbed(width)


def rounded(width):
    return Rounded(width)


# ---------------------------------------------------------------- fastwidth's GPT as a user's model

_DEMO_IO = {}


def demo_cfg(width: int, *sets: str):
    from fastwidth.config import load_config
    from fastwidth.config_args import config_path
    return load_config(str(config_path("demo")), [f"model.width={width}", *sets])


def gpt_demo(width):
    """fastwidth.models.gpt at `width` for the demo config's data (stdlib bytes, seq_len 64)."""
    from fastwidth.data import build_stream, data_io
    from fastwidth.models import gpt
    cfg = demo_cfg(width)
    if "io" not in _DEMO_IO:
        _DEMO_IO["io"] = data_io(build_stream(cfg.data), cfg)
    return gpt.build(cfg, _DEMO_IO["io"])


def gpt_demo_tied(width):
    from fastwidth.models import gpt
    gpt_demo(width)
    return gpt.build(demo_cfg(width, "model.tie_embeddings=true"), _DEMO_IO["io"])


# ---------------------------------------------------------------- a model prepared with microsoft/mup

MUP_BASE = 16


class MupMLP(nn.Module):
    """What mup's README writes: nn.Linear layers, MuReadout, set_base_shapes by the factory."""

    def __init__(self, width: int, in_features: int = 784, classes: int = 10, output_mult: float = 2.0):
        super().__init__()
        from mup import MuReadout
        self.layers = nn.ModuleList([nn.Linear(in_features, width), nn.Linear(width, width)])
        self.norm = nn.LayerNorm(width)
        self.readout = MuReadout(width, classes, output_mult=output_mult)

    def forward(self, x):
        h = x.flatten(1)
        for lin in self.layers:
            h = torch.relu(lin(h))
        return self.readout(self.norm(h))


def mup_mlp(width):
    import mup
    model = MupMLP(width)
    mup.set_base_shapes(model, MupMLP(MUP_BASE), delta=MupMLP(2 * MUP_BASE))
    return model


# ---------------------------------------------------------------- refused families

class _Square(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.stem = nn.Linear(784, width)
        self.outer = nn.Linear(width, width * width // 8)   # fan_in ×2, fan_out ×4 from 32 to 64
        self.head = nn.Linear(width * width // 8, 10)

    def forward(self, x):
        return self.head(self.outer(torch.relu(self.stem(x.flatten(1)))))


def bad_ratio(width):
    return _Square(width)


def no_readout(width):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width))


class _Scaled(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.stem = nn.Linear(784, width)
        self.gate = nn.Parameter(torch.ones(width))   # a 1-D parameter of a module fastwidth cannot read
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.gate * torch.relu(self.stem(x.flatten(1))))


def unknown_vector(width):
    return _Scaled(width)


def not_a_module(width):
    return {"width": width}


class _Lookup(nn.Module):
    """A token table of the user's own class, not named like an embedding: by shape a readout."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, width))

    def forward(self, idx):
        return nn.functional.embedding(idx, self.table)


class _TwoReadouts(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lookup = _Lookup(VOCAB, width)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, idx):
        return self.head(self.lookup(idx))


def two_readouts(width):
    return _TwoReadouts(width)
