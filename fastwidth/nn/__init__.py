"""Thin µP-aware modules calling fastwidth.kernels."""
from fastwidth.nn.attention import Attention
from fastwidth.nn.layers import BatchNorm2d, MuConv2d, MuEmbedding, MuLinear, MuReadout, Norm, TiedReadout

__all__ = ["Attention", "BatchNorm2d", "MuConv2d", "MuEmbedding", "MuLinear", "MuReadout", "Norm", "TiedReadout"]
