"""The empirical NTK of a scalar output on probe points, its eigenvalues and task power C(k).

    out = probe_output_fn(model, probe, n_points=32)        # f(idx) -> (len(idx),) outputs
    K, method = entk(out.fn, out.n, list(model.parameters()), max_bytes=256 << 20)
    eig, c = spectrum(K, out.target)

K_ij = ∇θ f(x_i)ᵀ D ∇θ f(x_j) with D = diag(weights): the identity gives the raw JJᵀ; the
per-group learning rates give the kernel that drives training, J·diag(η_group)·Jᵀ (under µP every
group has its own LR, so the raw kernel's composition changes with width by construction: on a
trained µP MLP its hidden-layer share grows from 9% to 65% between widths 64 and 1024 while the
LR-weighted share stays near 10%); Adam's preconditioner lr/(√v̂+ε) per element gives the
preconditioned one. Gradients come from one backward per point. When the P gradients
fit in `max_bytes` they are stacked and K = G Gᵀ exactly; otherwise each column is a directional
derivative J g_j computed by a central difference of the batched forward (2 forwards per column),
so memory stays at one gradient whatever the width, and any fused kernel works.

The scalar output is the centered logit of one class c, f(x) = z_c(x) - mean_j z_j(x) (invariant
to the softmax shift), with c the most frequent target among the NTK points so the task vector
y_i = 1[y_i = c] - mean is not all zeros. Both depend only on the probe: the same for every width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

FD_STEP = 1e-2  # h along the unit direction g_j/||g_j|| (all parameters); fp32 error ~1e-5 relative


@dataclass
class ProbeOutput:
    fn: Callable[[torch.Tensor], torch.Tensor]   # point indices -> (len,) scalar outputs (grad-enabled)
    n: int
    target: torch.Tensor                         # (n,) centered task vector
    cls: int


def probe_output_fn(model: torch.nn.Module, probe: dict, n_points: int, device) -> ProbeOutput:
    """Scalar outputs at n_points probe points: examples, or the last token of the first sequences."""
    x, y = probe["x"], probe["y"]
    n = min(n_points, x.shape[0])
    tokens = y.dim() > 1
    ys = y[:n, -1] if tokens else y[:n]                               # (n,) targets of the points
    cls = int(torch.bincount(ys).argmax())
    target = (ys == cls).double()
    target = target - target.mean()

    def fn(idx: torch.Tensor) -> torch.Tensor:
        logits = model(x[idx].to(device)).float()                     # (b, C) or (b, T, V)
        z = logits[:, -1] if tokens else logits                       # (b, C)
        return z[:, cls] - z.mean(-1)

    return ProbeOutput(fn, n, target, cls)


def _flat_grad(out: torch.Tensor, params: list) -> torch.Tensor:
    g = torch.autograd.grad(out, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for gi, p in zip(g, params)])


def group_lr_weights(optimizer: torch.optim.Optimizer, params: list) -> list[float]:
    """Each parameter's learning rate from its optimizer param group (the diagonal of J·diag(η)·Jᵀ)."""
    lr = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
    return [lr.get(id(p), 0.0) for p in params]


def _weighted(g: list, weights) -> list:
    return g if weights is None else [gi * w for gi, w in zip(g, weights)]


def entk(fn: Callable, n: int, params: list, *, max_bytes: int = 256 << 20, method: str = "auto",
         weights: list | None = None) -> tuple[torch.Tensor, str]:
    """The (n, n) float64 eNTK of fn over its n points; method "auto" | "exact" | "fd".

    weights: one float or one tensor shaped like its parameter per parameter (D's diagonal);
    None = the raw kernel JJᵀ.
    """
    numel = sum(p.numel() for p in params)
    if method == "auto":
        method = "exact" if n * numel * 4 <= max_bytes else "fd"
    idx_all = torch.arange(n)
    if method == "exact":
        with torch.enable_grad():
            G = torch.stack([_flat_grad(fn(idx_all[i:i + 1]).sum(), params) for i in range(n)])  # (n, numel)
        G = G.double()
        if weights is None:
            return G @ G.T, method
        d = torch.cat([torch.as_tensor(w, dtype=torch.float64).expand(p.shape).reshape(-1)
                       for w, p in zip(weights, params)])
        return (G * d) @ G.T, method
    K = torch.zeros(n, n, dtype=torch.float64)
    for j in range(n):
        with torch.enable_grad():
            g = torch.autograd.grad(fn(idx_all[j:j + 1]).sum(), params, allow_unused=True)
        g = _weighted([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)], weights)
        gnorm = float(torch.sqrt(sum((gi.double() ** 2).sum() for gi in g)))
        if gnorm == 0:
            continue
        step = FD_STEP / gnorm
        outs = []
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]  # exact restore, unlike add then sub
            try:
                for sign in (1.0, -1.0):
                    for p, p0, gi in zip(params, saved, g):
                        p.copy_(p0).add_(gi, alpha=sign * step)
                    outs.append(fn(idx_all).double().cpu())
            finally:
                for p, p0 in zip(params, saved):
                    p.copy_(p0)
        K[:, j] = (outs[0] - outs[1]) / (2 * FD_STEP) * gnorm   # J (D g_j/|D g_j|) |D g_j| = J D g_j
    return (K + K.T) / 2, method


def spectrum(K: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and C(k) = sum_{i<=k} (u_i^T y)^2 / ||y||^2 for k = 1..n."""
    evals, evecs = torch.linalg.eigh(K.double())
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order], evecs[:, order]
    y = target.double()
    power = (evecs.T @ y) ** 2
    denom = (y * y).sum()
    c = torch.cumsum(power, 0) / denom if denom > 0 else torch.full_like(power, float("nan"))
    return evals, c
