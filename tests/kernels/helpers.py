"""Helpers for kernel tests: poisoned allocation and error bounds against fp64.

The Triton launches in these tests run in the interpreter on the CPU (fastwidth/kernels/_triton.py
switches per launch; TRITON_INTERPRET need not be set). The interpreter never notices an
out-of-bounds load or a skipped store, so `poisoned()` makes every torch.empty* inside a call
return NaN (floats) or a sentinel (ints): an element the kernel forgot to write stays NaN.
"""

import contextlib

import torch

_INT_SENTINEL = -(2 ** 31) + 7


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool and t.numel():
        t.fill_(_INT_SENTINEL)
    return t


@contextlib.contextmanager
def poisoned():
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    torch.empty = lambda *a, **k: _poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: _poison(empty_like(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: _poison(new_empty(self, *a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty


def check_bound(name: str, out: torch.Tensor, ref64: torch.Tensor, torch_lp: torch.Tensor, atol: float,
                factor: float = 2.0) -> None:
    """|out - ref64| <= factor * |torch_lp - ref64| + atol everywhere, and out fully finite.

    torch_lp is PyTorch's own result at the test's precision: the kernel may be as wrong as
    PyTorch is, twice over, plus a small absolute slack (flash-attention's test rule)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: {int((~torch.isfinite(out)).sum())} non-finite elements"
    err = (out.double() - ref64).abs().max().item()
    base = (torch_lp.double() - ref64).abs().max().item()
    assert err <= factor * base + atol, f"{name}: max error {err:.3g} > {factor} x torch's {base:.3g} + {atol:g}"


ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def leaves(*ts, dtype):
    """Copies of ts in dtype as fresh leaves that require grad (None stays None)."""
    return [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in ts]


def fwd_bwd(fn, inputs, upstream):
    """outs = fn(*inputs); grads of sum(out * g) for the shared upstream grads g."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    diff = [(o, g.to(o.dtype)) for o, g in zip(outs, upstream) if g is not None]
    wrt = [t for t in inputs if t is not None and t.requires_grad]
    grads = torch.autograd.grad([o for o, _ in diff], wrt, [g for _, g in diff])
    return outs, grads


def compare(fn_kernel, fn_ref, raw_inputs, upstream, dtype, names, atol=None, factor=None):
    """Kernel at dtype vs torch at dtype vs torch at fp64: outputs and every input gradient."""
    atol = ATOL[dtype] if atol is None else atol
    # The interpreter truncates fp32 -> bf16 stores where torch (and a GPU) rounds to nearest:
    # up to a whole bf16 ulp against torch's half ulp, so 3x instead of 2x there.
    if factor is None:
        factor = 3.0 if dtype == torch.bfloat16 and raw_inputs[0].device.type == "cpu" else 2.0
    with poisoned():
        k_out, k_grad = fwd_bwd(fn_kernel, leaves(*raw_inputs, dtype=dtype), upstream)
    t_out, t_grad = fwd_bwd(fn_ref, leaves(*raw_inputs, dtype=dtype), upstream)
    r_out, r_grad = fwd_bwd(fn_ref, leaves(*raw_inputs, dtype=torch.float64), upstream)
    for i, (k, t, r) in enumerate(zip(k_out, t_out, r_out)):
        check_bound(f"{names[0]} output {i}", k, r, t, atol, factor)
    assert len(k_grad) == len(r_grad)
    for n, k, t, r in zip(names[1:], k_grad, t_grad, r_grad):
        assert k.dtype == t.dtype, f"grad {n}: dtype {k.dtype} != {t.dtype}"
        check_bound(f"grad {n}", k, r, t, atol, factor)


def norm_fn(is_rms: bool, residual: bool, backend):
    """(x, r, w, b) -> the norm's outputs through `backend` (None: norm_ref), for compare()."""
    from fastwidth.kernels import norm

    def f(x, r, w, b):
        y, s, rms = norm._norm(x, r, w, b, 1e-5, is_rms, backend) if backend else \
            norm.norm_ref(x, r, w, b, 1e-5, is_rms)
        return (y, s) if residual else (y,)
    return f


def readout_ce_fn(t, mult: float, kw: dict, backend):
    """(h, w, b) -> readout_ce_stats' loss, token_loss, lse, true_logit through `backend`."""
    from fastwidth.kernels import readout_ce as rc

    def f(h, w, b):
        r = rc.readout_ce_stats(h, w, t, multiplier=mult, bias=b, backend=backend, **kw)
        return r.loss, r.token_loss, r.lse, r.true_logit
    return f
