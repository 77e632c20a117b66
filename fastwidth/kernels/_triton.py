"""Triton kernels that run compiled on CUDA tensors and interpreted on CPU tensors.

Why not plain `@triton.jit`: triton (3.0 .. 3.9) reads TRITON_INTERPRET through
`triton.knobs.runtime.interpret` once, when the decorator runs, and returns either a
JITFunction or an InterpretedFunction for good. Kernels defined at import would then be
bound to whatever the environment held when fastwidth.kernels was first imported (in a
test session: whichever test file happened to be collected first). `jit` below keeps one
object that is a real JITFunction (so the compiler, nested calls and @triton.autotune see
what they expect on a GPU) and switches to the interpreter per launch when the tensors
live on the CPU, so TRITON_INTERPRET need not be set at all.

Also what every kernel family shares: device math without libdevice, next_pow2, interpreting,
and AotConfig, the entry of a family's AOT_KERNELS table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastwidth.errors import UserError

try:  # triton is a hard dependency on Linux, but keep the torch path alive without it
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False


def require_triton() -> None:
    if not HAS_TRITON:
        raise UserError("kernels=triton needs the triton package (pip install triton); use kernels=torch")


if HAS_TRITON:

    class _DualJIT(JITFunction):
        """A JITFunction that interprets itself when launched on CPU tensors."""

        def __init__(self, fn):
            super().__init__(fn)
            self._interp = InterpretedFunction(fn)

        def run(self, *args, grid, warmup, **kwargs):
            on_cpu = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args)
            if not on_cpu:
                return super().run(*args, grid=grid, warmup=warmup, **kwargs)
            # triton.language's own helpers (tl.sum, tl.max, tl.cdiv, ...) are plain JITFunctions
            # unless TRITON_INTERPRET was set when triton was imported; calling one from an
            # interpreted kernel raises. For the length of this launch, make such calls run
            # interpreted too. The compiler never calls JITFunction.__call__, so a GPU launch
            # in another thread would be unaffected.
            saved = JITFunction.__call__
            JITFunction.__call__ = _interpreted_call
            try:
                return self._interp.run(*args, grid=grid, warmup=warmup, **kwargs)
            finally:
                JITFunction.__call__ = saved

        def __call__(self, *args, **kwargs):
            # Only reached from inside an interpreted kernel (a nested device-function call);
            # the compiler handles nested JITFunctions from the AST and never calls this.
            return self._interp(*args, **kwargs)

    _interpreted: dict = {}

    def _interpreted_call(self, *args, **kwargs):
        fn = _interpreted.get(self.fn)
        if fn is None:
            fn = _interpreted[self.fn] = InterpretedFunction(self.fn)
        return fn(*args, **kwargs)

    def jit(fn):
        return _DualJIT(fn)

    # Device math shared by the kernels: libdevice tanh/erf do not run in the interpreter.

    @jit
    def tanh_from_exp(u):
        # exp(2u) overflows to inf for u > 44 and gives exactly 1, as it should.
        return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)

    @jit
    def gelu_tanh_inner(x):
        # the tanh of GELU's tanh approximation (GPT-2): tanh(√(2/π) (x + 0.044715 x³))
        return tanh_from_exp(0.7978845608028654 * (x + 0.044715 * x * x * x))

else:  # pragma: no cover

    def jit(fn):
        return fn

    gelu_tanh_inner = None


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def interpreting(t: torch.Tensor) -> bool:
    """True when a launch on `t` runs in the Triton interpreter (fixed configs, no autotune)."""
    return t.device.type == "cpu"



@dataclass
class AotConfig:
    """One compilation of a kernel family's AOT_KERNELS table: a @jit kernel with the constexprs and
    launch options a GPU launch of it passes. Each family builds its table from the very constants
    its launchers use; `python -m fastwidth.kernels.aot` compiles every entry for sm_90 (no GPU)."""

    fn: object  # the @jit kernel
    dtype: str  # "bf16" | "fp32": the element type of every pointer not in ptr_types
    constexprs: dict
    num_warps: int
    num_stages: int = 3  # Triton's default: what a launch that passes none gets
    ptr_types: dict = field(default_factory=dict)  # pointer arg -> element type, where not `dtype`
    scalar_types: dict = field(default_factory=dict)  # scalar arg -> "fp32" | "i64", where not i32
