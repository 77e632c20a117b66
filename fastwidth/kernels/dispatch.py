"""Which implementation an op runs: the torch reference, the Triton kernel or the native op.

`train.kernels` (auto | torch | triton | native) sets the process default with `set_backend`;
every functional also takes `backend=` to override it per call. auto = Triton for CUDA tensors,
the native C++ ops (csrc/, fastwidth/kernels/native.py) for CPU tensors when they build or load,
torch otherwise. "triton" on a CPU tensor runs the Triton interpreter (slow, for tests): see
_triton.py for why that needs no TRITON_INTERPRET in the environment. Families without a
native kernel (attention, activations) run torch where "native" is asked for.
"""

from __future__ import annotations

import contextlib

import torch

from fastwidth.errors import UserError
from fastwidth.kernels import native
from fastwidth.kernels._triton import HAS_TRITON, require_triton

BACKENDS = ("auto", "torch", "triton", "native")
_default = "auto"


def set_backend(name: str) -> None:
    """Set the process-wide default backend: "auto", "torch", "triton" or "native"."""
    global _default
    if name not in BACKENDS:
        raise UserError(f"kernels backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "triton":
        require_triton()
    if name == "native":
        native.load()
    _default = name


@contextlib.contextmanager
def using(name: str):
    """The process-wide default backend set to `name` inside the block (restored after)."""
    global _default
    old = _default
    set_backend(name)
    try:
        yield
    finally:
        _default = old


def get_backend() -> str:
    """The process-wide default backend as set (may be "auto")."""
    return _default


def resolve(backend: str | None, x: torch.Tensor, extra: tuple[str, ...] = ()) -> str:
    """The concrete backend an op on tensor `x` runs: "torch", "triton", "native" or one of `extra`.

    Inputs: backend (None = process default), x (decides auto), extra (op-specific names,
    e.g. attention's "math" and "flash"). Outputs: the name to dispatch on.
    """
    name = _default if backend is None else backend
    if name == "auto":
        if x.is_cuda:
            return "triton" if HAS_TRITON else "torch"
        return "native" if native.available() else "torch"
    if name == "triton":
        require_triton()
        return name
    if name == "native":
        native.load()
        return name
    if name == "torch" or name in extra:
        return name
    valid = ", ".join(BACKENDS + tuple(extra))
    raise UserError(f"kernel backend {name!r} is not one of {valid}")
