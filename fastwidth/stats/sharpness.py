"""Sharpness: the top eigenvalue of the training loss's Hessian on a training batch, by Lanczos.

    row = train_batch_sharpness(model, optimizer, x, y, "ce", iters=20, tol=RESIDUAL_TOL, hvp="auto")
    lam, info = lanczos_top_eig(loss_fn, params, precond=None, iters=20, tol=RESIDUAL_TOL)

One procedure for every sharpness the loop reports (the `sharpness` rows at evaluations and the
`batch_sharpness` trajectory, λ0 of optim.lr_unit=edge): the loss the member trains on, on a
batch it trains on, in train mode (BatchNorm with the batch's statistics, its running statistics
restored afterwards), by Lanczos stopped on the residual of the top Ritz pair.

Two HVPs: "double" (double backward, exact, needs every op twice differentiable) and "fd"
(central difference of gradients, (g(θ+hv) - g(θ-hv)) / 2h, which works through any fused
kernel that has a first backward). "auto" tries double backward and falls back to fd when an op
refuses it.

With per-group learning rates (µP) the quantity that decides stability is not λ_max(H) but that
of the preconditioned Hessian P^{1/2} H P^{1/2}, where P holds each parameter's step size:
gradient descent with momentum μ is stable while it stays below 2(1+μ), Adam with β1 below
(2+2β1)/(1-β1) with P = lr / (sqrt(v̂)+ε) (Cohen et al. 2022, "Adaptive gradient methods at the
edge of stability"). `optimizer_preconditioner` builds P and that threshold from a live
optimizer; the rows give λ·2/threshold as `lr_sharpness`, so every optimizer's edge is at 2.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

FD_STEP = 1e-3  # h for the fd HVP, relative to the RMS of the parameters (fp32 rounding vs curvature)
RESIDUAL_TOL = 1e-2  # Lanczos stops at ||A y - θ y|| <= tol·|θ| (stats.sharpness_tol; measured below)
INVARIANT = 1e-10   # β_k below this times the largest projection: the Krylov space is invariant


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
                    tol: float = RESIDUAL_TOL, hvp: str = "auto", seed: int = 0,
                    reduce: Callable | None = None) -> tuple[float, dict]:
    """The largest (algebraic) eigenvalue of A = P^{1/2} H P^{1/2} by Lanczos, stopped on the residual.

    Estimates λ_max(A), P = identity when precond is None. After k Hessian-vector products the
    top Ritz value θ of the Krylov space (Rayleigh-Ritz on its orthonormal basis Q_k, kept
    orthogonal by Gram-Schmidt twice per step) is biased low: θ ≤ λ_max, the gap closing as the
    space grows. The stop is a convergence test, not a small change of θ: it stops once the Ritz
    pair (θ, y = Q_k s) has relative residual ||A y - θ y|| / |θ| <= tol, which puts an eigenvalue
    of A within tol·|θ| of θ whatever the gap to the next one (for symmetric A), and within
    (tol·θ)²/gap when the gap is known. The residual is exact, not Paige's β_k|s_k| estimate:
    each step records every Gram-Schmidt coefficient, so A Q_k = Q_{k+1} Ĥ holds as a vector
    identity and ||A y - θ y|| = ||Ĥ s - θ [s; 0]||, which also sees an fd HVP's asymmetry; no
    HVP beyond one per step. What it cannot see: an eigenvalue whose eigenvector the start
    vector misses (a Krylov method's limit; the seeded Gaussian start has it with probability 0).
    Inputs: loss_fn() -> scalar (a fixed batch), params (tensors with requires_grad), precond
    (per-parameter positive tensors or floats, same order), iters (at most this many steps, one
    HVP each), tol (relative residual), hvp ("auto" | "double" | "fd"), seed (the start vector),
    reduce(list of tensors) -> list: applied to every HVP (data parallelism: each rank's HVP on
    its share of the batch averaged over the ranks, the global batch's HVP; every rank then
    takes the same steps).
    Outputs: (eigenvalue, {"iters": HVPs used, "hvp": method, "converged": residual <= tol,
    "residual": the final relative residual}).
    """
    params = list(params)
    root = ([torch.ones_like(p) for p in params] if precond is None else
            [torch.as_tensor(d, dtype=p.dtype, device=p.device).sqrt().expand_as(p) for p, d in zip(params, precond)])
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = [torch.randn(p.shape, generator=g).to(p) for p in params]
    norm = float(torch.sqrt(_dot(v, v)))
    basis = [[x / norm for x in v]]
    proj = torch.zeros(iters + 1, iters, dtype=torch.float64)     # Ĥ: A q_i = Σ_j Ĥ[j, i] q_j
    mode, lam, res, k = hvp, math.nan, math.nan, 0
    for k in range(1, iters + 1):
        hu, mode = _hvp(loss_fn, params, [r * x for r, x in zip(root, basis[-1])], mode)
        if reduce is not None:
            hu = reduce(hu)
        w = [r * x for r, x in zip(root, hu)]                       # A q_k
        for _ in range(2):  # twice: one pass loses orthogonality when A q_k is near the span
            for j, q in enumerate(basis):
                c = float(_dot(q, w))
                proj[j, k - 1] += c
                w = [x - c * y for x, y in zip(w, q)]
        beta = float(torch.sqrt(_dot(w, w)))
        proj[k, k - 1] = beta
        lam, res = _top_ritz(proj[:k + 1, :k])
        if not (math.isfinite(lam) and math.isfinite(res)) or res <= tol * abs(lam):
            break
        if beta <= INVARIANT * float(proj[:k + 1, :k].abs().max()):  # the space is invariant (k = rank):
            break                                # a next vector would be rounding noise, not a direction
        basis.append([x / beta for x in w])
    rel = res / abs(lam) if lam != 0 else math.inf
    return lam, {"iters": k, "hvp": mode, "converged": bool(rel <= tol), "residual": rel}


def _top_ritz(proj: torch.Tensor) -> tuple[float, float]:
    """(θ, ||A y - θ y||) of the top Ritz pair from Ĥ ((k+1) × k): θ, s from the symmetric part
    of its square block (Q_kᵀ A Q_k for symmetric A), the residual from the whole of it."""
    k = proj.shape[1]
    square = proj[:k]
    evals, evecs = torch.linalg.eigh(0.5 * (square + square.T))
    theta, s = float(evals[-1]), evecs[:, -1]
    r = proj @ s
    r[:k] -= theta * s
    return theta, float(r.norm())


def _hvp(loss_fn, params, u, mode):
    """H u by the chosen method; "auto" tries double backward and falls back to fd."""
    if mode in ("auto", "double"):
        try:
            return hvp_double(loss_fn, params, u), "double"
        except RuntimeError:
            if mode == "double":
                raise
    return hvp_fd(loss_fn, params, u), "fd"


# --------------------------------------------------------------------------- the one procedure

def mse_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """0.5 Σ_c (f_c - onehot(y)_c)², mean over targets; logits (..., C), y (...)."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    onehot = F.one_hot(y.reshape(-1), logits.shape[-1]).to(logits.dtype)
    return 0.5 * (logits - onehot).pow(2).sum(-1).mean()


def plain_loss_fn(model, x, y, kind: str) -> Callable:
    """The training loss on (x, y) as a closure for HVPs: unfused ops, so double backward works.
    kind: "ce" (cross-entropy) or "mse" (train.loss)."""
    def loss_fn():
        logits = model(x)                                           # (..., C)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, fp64 kept
        if kind == "mse":
            return mse_loss(logits, y)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return loss_fn


@contextlib.contextmanager
def training_function(model):
    """The model as the training loss sees it (train mode: BatchNorm normalizes with the batch's
    statistics), with every buffer restored afterwards: the evaluation's forwards must not move
    BatchNorm's running statistics (nor its batch counter), which later evaluations use."""
    was = model.training
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    model.train()
    try:
        yield model
    finally:
        with torch.no_grad():
            for b, b0 in saved:
                b.copy_(b0)
        model.train(was)


def train_batch_sharpness(model, optimizer, x, y, loss: str, *, iters: int, tol: float = RESIDUAL_TOL,
                          hvp: str = "auto", seed: int = 0, precond: list | None = None,
                          reduce: Callable | None = None) -> dict:
    """Sharpness of the training loss on one training batch: the one procedure behind the loop's
    `sharpness` rows and the `batch_sharpness` rows (stats/training_rows.py).

    Estimates λ_max(P^{1/2} H P^{1/2}), H the Hessian of the loss `loss` on (x, y) in train mode
    (training_function), P the optimizer's per-parameter step sizes (optimizer_preconditioner) or
    `precond` when given; by lanczos_top_eig (biased low until converged; `converged` and
    `residual` say how far it got; no interval). (x, y) is this rank's share of the batch and
    reduce averages each HVP and the loss over the ranks: the global batch's values.
    Outputs: {precond_sharpness, threshold, precond, lr_sharpness (λ·2/threshold: every
    optimizer's edge at 2), batch_loss, iters, hvp, converged, residual}.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    threshold, pkind = 2.0, "given"
    if precond is None:
        precond, threshold, pkind = optimizer_preconditioner(optimizer, params)
    reduce = reduce or (lambda ts: ts)
    with training_function(model):
        loss_fn = plain_loss_fn(model, x, y, loss)
        lam, info = lanczos_top_eig(loss_fn, params, precond=precond, iters=iters, tol=tol, hvp=hvp, seed=seed,
                                    reduce=reduce)
        with torch.no_grad():
            batch_loss = float(reduce([loss_fn().detach().reshape(1)])[0])
    return {"precond_sharpness": lam, "threshold": threshold, "precond": pkind, "lr_sharpness": lam * 2.0 / threshold,
            "batch_loss": batch_loss, **info}
