"""Training dynamics across widths: MSE loss, learning rates in units of 2/λ0.

    loss = member_loss(model, x, y, "mse")                  # or "ce" (the model's fused readout + CE)
    lambda0 = apply_edge_lrs(members, batch(0), cfg)        # optim.lr_unit = edge: η = lr × 2/λ0

The rows that follow the dynamics (batch sharpness on the training batch, λ0, coord) are
statistics: stats/training_rows.py.

λ0 and edge units. λ0 is the top eigenvalue of P^{1/2} H P^{1/2} (stats/sharpness.py) at
initialization, on the first training batch, with P = D, the per-group lr multipliers (no
optimizer state yet). With optim.lr_unit = edge the configured lr (optim.lr or an entry of
sweep.lrs, kept as base_lr) is a multiple c of 2/λ0, and the member trains with η = c · 2/λ0 (its
own λ0): c < 1 starts stable, 1 < c < 2 is the catapult range for MSE (Lewkowycz et al. 2020: the
loss spikes, the sharpness falls below 2/η, the loss recovers), larger c diverges.
"""
from __future__ import annotations

import dataclasses

import torch

from fastwidth.param.optim import set_lr
from fastwidth.stats.sharpness import mse_loss, train_batch_sharpness  # noqa: F401 (mse_loss: public here too)


def member_loss(model, x: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """The training loss: "ce" through the model's fused readout + cross-entropy, or "mse"."""
    return model.loss(x, y) if kind == "ce" else mse_loss(model(x), y)


def lr_multipliers(optimizer, params: list) -> list[torch.Tensor]:
    """D: each parameter's lr multiplier (µP's per-group lr over the base lr)."""
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return [torch.full_like(p, float(where[id(p)]["lr_mult"])) for p in params]


def initial_sharpness(m, x, y, kind: str, iters: int, tol: float, hvp: str) -> float:
    """λ0 = λ_max(D^{1/2} H D^{1/2}) at the member's current parameters (before training)."""
    params = [p for p in m.model.parameters() if p.requires_grad]
    return train_batch_sharpness(m.model, m.optimizer, x, y, kind, iters=iters, tol=tol, hvp=hvp, seed=m.seed,
                                 precond=lr_multipliers(m.optimizer, params))["precond_sharpness"]


def apply_edge_lrs(members: list, batch: tuple, cfg) -> dict[str, float]:
    """optim.lr_unit = edge: give each member η = (its configured lr) × 2/λ0, λ0 its sharpness at
    init on `batch`, the first training batch (x, y); returns {member name: λ0} (empty for other
    units), which the λ0 rows report (stats/training_rows.py)."""
    if cfg.optim.lr_unit != "edge":
        return {}
    x, y = batch
    lambda0 = {}
    for m in members:
        lam0 = initial_sharpness(m, x, y, cfg.train.loss, max(cfg.stats.batch_sharpness_iters, 20),
                                 cfg.stats.sharpness_tol, cfg.stats.hvp)
        if not lam0 > 0:
            raise RuntimeError(f"{m.name}: initial sharpness {lam0} is not positive; optim.lr_unit=edge needs it")
        lambda0[m.name] = lam0
        m.cfg = dataclasses.replace(m.cfg, optim=dataclasses.replace(m.cfg.optim, lr=m.cfg.optim.lr * 2.0 / lam0))
        set_lr(m.optimizer, m.cfg.optim, m.step, cfg.train.steps)
    return lambda0
