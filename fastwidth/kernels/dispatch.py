"""Which implementation an op runs: the torch reference or the Triton kernel.

`train.kernels` (auto | torch | triton) sets the process default with `set_backend`; every
functional also takes `backend=` to override it per call. auto = Triton for CUDA tensors,
torch elsewhere. "triton" on a CPU tensor runs the Triton interpreter (slow, for tests):
see _triton.py for why that needs no TRITON_INTERPRET in the environment.
"""

from __future__ import annotations

import torch

from fastwidth.errors import UserError
from fastwidth.kernels._triton import HAS_TRITON, require_triton

BACKENDS = ("auto", "torch", "triton")
_default = "auto"


def set_backend(name: str) -> None:
    """Set the process-wide default backend: "auto", "torch" or "triton"."""
    global _default
    if name not in BACKENDS:
        raise UserError(f"kernels backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "triton":
        require_triton()
    _default = name


def get_backend() -> str:
    """The process-wide default backend as set (may be "auto")."""
    return _default


def resolve(backend: str | None, x: torch.Tensor, extra: tuple[str, ...] = ()) -> str:
    """The concrete backend an op on tensor `x` runs: "torch", "triton" or one of `extra`.

    Inputs: backend (None = process default), x (decides auto), extra (op-specific names,
    e.g. attention's "math" and "flash"). Outputs: the name to dispatch on.
    """
    name = _default if backend is None else backend
    if name == "auto":
        return "triton" if (x.is_cuda and HAS_TRITON) else "torch"
    if name == "triton":
        require_triton()
        return name
    if name == "torch" or name in extra:
        return name
    valid = ", ".join(BACKENDS + tuple(extra))
    raise UserError(f"kernel backend {name!r} is not one of {valid}")
