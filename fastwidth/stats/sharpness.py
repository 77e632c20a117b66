"""Sharpness: the top Hessian eigenvalue by power iteration on Hessian-vector products.

    lam, info = top_hessian_eig(loss_fn, params, precond=None, iters=20, hvp="auto")

Two HVPs: "double" (double backward, exact, needs every op twice differentiable) and "fd"
(central difference of gradients, (g(θ+hv) - g(θ-hv)) / 2h, which works through any fused
kernel that has a first backward). "auto" tries double backward and falls back to fd when an op
refuses it.

With per-group learning rates (µP) the quantity that decides stability is not λ_max(H) but that
of the preconditioned Hessian P^{1/2} H P^{1/2}, where P holds each parameter's step size:
gradient descent with momentum μ is stable while it stays below 2(1+μ), Adam with β1 below
(2+2β1)/(1-β1) with P = lr / (sqrt(v̂)+ε) (Cohen et al. 2022, "Adaptive gradient methods at the
edge of stability"). `optimizer_preconditioner` builds P and that threshold from a live
optimizer; the monitor logs λ·2/threshold as `lr_sharpness`, so every optimizer's edge is at 2.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

FD_STEP = 1e-3  # h for the fd HVP, relative to the RMS of the parameters (fp32 rounding vs curvature)


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def _grads(loss_fn, params, create_graph=False):
    return torch.autograd.grad(loss_fn(), params, create_graph=create_graph, allow_unused=True)


def hvp_double(loss_fn: Callable, params: list, v: list) -> list:
    """H v by double backward, through the torch reference ops: the fused kernels (Triton, native)
    have a first backward only, and a second backward through them drops their terms without an
    error, so the loss is recomputed with kernels=torch here."""
    from fastwidth.kernels import dispatch
    with torch.enable_grad(), dispatch.using("torch"):
        g = _grads(loss_fn, params, create_graph=True)
        g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
        dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
        hv = torch.autograd.grad(dot, params, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, params)]


@torch.no_grad()
def hvp_fd(loss_fn: Callable, params: list, v: list, h: float | None = None) -> list:
    """H v ≈ (∇L(θ + h v̂) - ∇L(θ - h v̂)) / 2h · ||v||: only first derivatives are needed."""
    vnorm = float(torch.sqrt(_dot(v, v)))
    if vnorm == 0:
        return [torch.zeros_like(p) for p in params]
    if h is None:
        n = sum(p.numel() for p in params)
        h = FD_STEP * max(float(torch.sqrt(_dot(params, params) / n)), 1e-3)
    step = h / vnorm
    saved = [p.detach().clone() for p in params]  # restore exactly: (θ + a) - a != θ in floating point
    out = []
    try:
        for sign in (1.0, -1.0):
            for p, p0, vi in zip(params, saved, v):
                p.copy_(p0).add_(vi, alpha=sign * step)
            with torch.enable_grad():
                g = _grads(loss_fn, params)
            out.append([torch.zeros_like(p) if gi is None else gi.detach() for gi, p in zip(g, params)])
    finally:
        for p, p0 in zip(params, saved):
            p.copy_(p0)
    return [(a - b) / (2 * step) for a, b in zip(*out)]


def top_hessian_eig(loss_fn: Callable, params: list, *, precond: list | None = None, iters: int = 20,
                    tol: float = 1e-3, hvp: str = "auto", seed: int = 0) -> tuple[float, dict]:
    """Largest (most positive) eigenvalue of A = P^{1/2} H P^{1/2} (P = identity when precond is None).

    Power iteration finds the largest-magnitude eigenvalue; near initialization that can be a
    negative one, and then a second run on A - λ_neg I (whose top-magnitude eigenvalue is
    λ_max - λ_neg > 0) recovers λ_max, at twice the cost only when it happens.
    Inputs: loss_fn() -> scalar (a fixed batch), params (tensors with requires_grad), precond
    (per-parameter positive tensors or floats, same order), iters (power steps per run), tol
    (stop on a relative change below it), hvp ("auto" | "double" | "fd").
    Outputs: (eigenvalue, {"iters", "hvp", "converged"}).
    """
    lam, info = _power(loss_fn, params, precond, iters, tol, hvp, seed, shift=0.0)
    if lam < 0:
        mu, info2 = _power(loss_fn, params, precond, iters, tol, info["hvp"], seed, shift=lam)
        lam = mu + lam
        info = {"iters": info["iters"] + info2["iters"], "hvp": info2["hvp"], "converged": info2["converged"]}
    return lam, info


def _power(loss_fn, params, precond, iters, tol, hvp, seed, shift):
    params = list(params)
    if precond is None:
        root = [torch.ones_like(p) for p in params]
    else:
        root = [torch.as_tensor(d, dtype=p.dtype, device=p.device).sqrt().expand_as(p) for p, d in zip(params, precond)]
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = [torch.randn(p.shape, generator=g).to(p) for p in params]
    norm = float(torch.sqrt(_dot(v, v)))
    v = [x / norm for x in v]
    mode = hvp
    lam, prev, done, k = math.nan, math.nan, False, 0
    for k in range(1, iters + 1):
        u = [r * x for r, x in zip(root, v)]                      # P^{1/2} v
        if mode in ("auto", "double"):
            try:
                hu = hvp_double(loss_fn, params, u)
                mode = "double"
            except RuntimeError:
                if mode == "double":
                    raise
                mode = "fd"
        if mode == "fd":
            hu = hvp_fd(loss_fn, params, u)
        w = [r * x - shift * y for r, x, y in zip(root, hu, v)]   # (P^{1/2} H P^{1/2} - shift) v
        lam = float(_dot(v, w))                                   # Rayleigh quotient, ||v|| = 1
        norm = float(torch.sqrt(_dot(w, w)))
        if norm == 0 or not math.isfinite(norm):
            break
        v = [x / norm for x in w]
        if math.isfinite(prev) and abs(lam - prev) <= tol * abs(lam):
            done = True
            break
        prev = lam
    return lam, {"iters": k, "hvp": mode, "converged": done}


def optimizer_preconditioner(optimizer: torch.optim.Optimizer, params: list) -> tuple[list, float, str]:
    """Per-parameter step sizes P, the stability threshold and its name, from a live optimizer.

    SGD(momentum μ): P = lr, threshold 2(1+μ). Adam/AdamW with state: P = lr / (sqrt(v̂) + ε),
    threshold (2+2β1)/(1-β1). Adam before its first step has no v̂: P = lr, threshold 2 (the
    plain-GD edge), named "lr".
    """
    where = {id(p): grp for grp in optimizer.param_groups for p in grp["params"]}
    precond, kind, threshold = [], "lr", 2.0
    is_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    for p in params:
        grp = where.get(id(p))
        lr = float(grp["lr"]) if grp is not None else 0.0
        st = optimizer.state.get(p, {}) if grp is not None else {}
        if is_adam and "exp_avg_sq" in st:
            b1, b2 = grp["betas"]
            t = float(st["step"])
            vhat = st["exp_avg_sq"] / (1 - b2 ** t)
            precond.append(lr / (vhat.sqrt() + grp["eps"]))
            kind, threshold = "adam", (2 + 2 * b1) / (1 - b1)
        else:
            precond.append(torch.full_like(p, lr))
            if not is_adam and grp is not None:
                threshold = 2.0 * (1.0 + float(grp.get("momentum", 0.0)))
    return precond, threshold, kind


def lanczos_top_eig(loss_fn: Callable, params: list, *, precond: list | None = None, iters: int = 20,
                    tol: float = 1e-3, hvp: str = "auto", seed: int = 0, reduce: Callable | None = None) -> tuple[float, dict]:
    """Largest eigenvalue of A = P^{1/2} H P^{1/2} by Lanczos with full reorthogonalization.

    After k Hessian-vector products the top Ritz value (largest eigenvalue of the k×k tridiagonal
    T_k) approximates λ_max(A) from below and converges much faster than power iteration when the
    top of the spectrum is not well separated. It is exact once k reaches the rank of A. Stops when
    the top Ritz value changes by less than tol (relative) between iterations, or after `iters`.
    Inputs as `top_hessian_eig`, and reduce(list of tensors) -> list: applied to every HVP (data
    parallelism: each rank's HVP on its share of the batch averaged over the ranks, the global
    batch's HVP; every rank then takes the same Lanczos steps). Outputs: (eigenvalue, {"iters",
    "hvp", "converged"}); the eigenvalue is the largest algebraic one (a negative top eigenvalue
    is returned as such).
    """
    params = list(params)
    root = ([torch.ones_like(p) for p in params] if precond is None else
            [torch.as_tensor(d, dtype=p.dtype, device=p.device).sqrt().expand_as(p) for p, d in zip(params, precond)])
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = [torch.randn(p.shape, generator=g).to(p) for p in params]
    norm = float(torch.sqrt(_dot(v, v)))
    v = [x / norm for x in v]
    basis, alphas, betas = [v], [], []
    mode, prev, lam, done, k = hvp, math.nan, math.nan, False, 0
    for k in range(1, iters + 1):
        u = [r * x for r, x in zip(root, v)]
        hu, mode = _hvp(loss_fn, params, u, mode)
        if reduce is not None:
            hu = reduce(hu)
        w = [r * x for r, x in zip(root, hu)]                       # A v
        alphas.append(float(_dot(v, w)))
        for q in basis:                                            # full reorthogonalization
            c = float(_dot(q, w))
            w = [x - c * y for x, y in zip(w, q)]
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        lam = float(torch.linalg.eigvalsh(T)[-1])
        beta = float(torch.sqrt(_dot(w, w)))
        if (math.isfinite(prev) and abs(lam - prev) <= tol * abs(lam)) or beta <= 1e-10 * max(abs(lam), 1e-30):
            done = True
            break
        if not math.isfinite(beta):
            break
        prev = lam
        betas.append(beta)
        v = [x / beta for x in w]
        basis.append(v)
    return lam, {"iters": k, "hvp": mode, "converged": done}


def _hvp(loss_fn, params, u, mode):
    """H u by the chosen method; "auto" tries double backward and falls back to fd."""
    if mode in ("auto", "double"):
        try:
            return hvp_double(loss_fn, params, u), "double"
        except RuntimeError:
            if mode == "double":
                raise
    return hvp_fd(loss_fn, params, u), "fd"
