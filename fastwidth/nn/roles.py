"""The µP role of a parameter, assigned when its layer is built (never guessed from names or dims).

A role says which of a tensor's dimensions grow with width:
    INPUT   fan_out grows, fan_in fixed      (token embedding, first MLP layer, ResNet stem)
    HIDDEN  both grow                        (attention q/k/v/o, MLP, convolutions)
    OUTPUT  fan_in grows, fan_out fixed      (the readout)
    VECTOR  one width dimension, no fan_in   (biases, norm gains)
    FIXED   no width dimension               (the readout bias)
"""
from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    INPUT = "input"
    HIDDEN = "hidden"
    OUTPUT = "output"
    VECTOR = "vector"
    FIXED = "fixed"


class Init(str, Enum):
    """How a parameter is drawn before the parameterization scales it."""

    FAN_IN = "fan_in"    # N(0, σ² / fan_in) in sp; the table rescales per role and kind
    EMBED = "embed"      # N(0, embed_std²): one-hot inputs, no fan_in
    QUERY = "query"      # like FAN_IN, zeroed under µP kinds when param.zero_query
    BIAS = "bias"        # a layer's bias: 0 under param.init=normal, U(±1/√fan_in of its layer) under torch
    ZEROS = "zeros"
    ONES = "ones"


class HasRoles:
    """Mixin for fastwidth.nn modules: `mup_roles()` maps each own parameter to (Role, Init)."""

    def mup_roles(self) -> dict[str, tuple[Role, Init]]:  # pragma: no cover - interface
        raise NotImplementedError
