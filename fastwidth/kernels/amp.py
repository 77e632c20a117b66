"""Autocast for the custom ops: autocast never looks inside a torch.library custom op.

Autocast rewrites aten ops (a GEMM becomes a bf16 GEMM) but passes a custom op through with its
inputs as they are, and then rewrites the aten ops *inside* its implementation, so a launcher that
preallocates outputs or passes `out=` sees dtypes change under it. The functionals therefore
decide the compute dtype before the op, as autocast would for the aten op they replace (casting
their inputs with differentiable casts, so gradients come back in the parameter dtype, as in
eager AMP), and the launchers run with autocast off.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch


def autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run a GEMM-like op on `t` in, or None when autocast is off there."""
    dev = t.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def cast_for_autocast(*ts: Optional[torch.Tensor]) -> tuple:
    """ts cast (differentiably) to the autocast dtype of the first's device, as autocast casts an
    aten op's inputs: floating tensors other than fp64 (which autocast leaves alone, so fp64
    references stay fp64). None stays None; without autocast, ts unchanged."""
    dt = autocast_dtype(ts[0])
    if dt is None:
        return ts
    return tuple(t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in ts)


def autocast_off(t: torch.Tensor):
    """Context that turns autocast off on t's device for the length of a launch."""
    dev = t.device.type
    if dev not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(dev, enabled=False)
