"""Training dynamics across widths: MSE loss, learning rates in units of 2/λ0, sharpness trajectories.

    loss = member_loss(model, x, y, "mse")                  # or "ce" (the model's fused readout + CE)
    apply_edge_lrs(trainer)                                 # optim.lr_unit = edge: η = lr × 2/λ0
    write_batch_sharpness(trainer, step, members, x, y)     # a "batch_sharpness" row per member

Sharpness on the training batch. With full_batch the batch is the fixed one every step trains on
(gradient descent); online it is the batch the step just trained on ("a recent training batch"),
not the probe. The quantity is the top eigenvalue λ of P^{1/2} H P^{1/2}, P the optimizer's
per-parameter step sizes (stats/sharpness.py), by Lanczos. Rows give it in units of the base
step size η_t (the base lr times the schedule): sharpness = λ / η_t, to be read against
edge = threshold / η_t, which is 2/η for plain gradient descent. Under SP with SGD, P = η I and
sharpness is λ_max(H) itself; under µP, P = η D with D the per-group lr multipliers, and
sharpness is λ_max(D^{1/2} H D^{1/2}), the curvature in µP's own metric. Adam: P = η/(√v̂+ε)
and the edge is (2+2β1)/(1-β1)/η (Cohen et al. 2022).

λ0 and edge units. λ0 is the same sharpness at initialization, on the first training batch, with
P = D (no optimizer state yet). With optim.lr_unit = edge the configured lr (optim.lr or an
entry of sweep.lrs, kept as base_lr) is a multiple c of 2/λ0, and the member trains with
η = c · 2/λ0 (its own λ0): c < 1 starts stable, 1 < c < 2 is the catapult range for MSE (Lewkowycz
et al. 2020: the loss spikes, the sharpness falls below 2/η, the loss recovers), larger c diverges.
"""
from __future__ import annotations

import dataclasses

import torch

from fastwidth.param.optim import set_lr
from fastwidth.parallel.stats import whole_member
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


def apply_edge_lrs(trainer) -> None:
    """optim.lr_unit = edge: give each member η = (its configured lr) × 2/λ0; keeps λ0 per member."""
    cfg = trainer.cfg
    trainer.lambda0 = {}
    if cfg.optim.lr_unit != "edge":
        return
    x, y = trainer.batch(0)
    for m in trainer.members:
        lam0 = initial_sharpness(m, x, y, cfg.train.loss, max(cfg.stats.batch_sharpness_iters, 20),
                                 cfg.stats.sharpness_tol, cfg.stats.hvp)
        if not lam0 > 0:
            raise RuntimeError(f"{m.name}: initial sharpness {lam0} is not positive; optim.lr_unit=edge needs it")
        trainer.lambda0[m.name] = lam0
        m.cfg = dataclasses.replace(m.cfg, optim=dataclasses.replace(m.cfg.optim, lr=m.cfg.optim.lr * 2.0 / lam0))
        set_lr(m.optimizer, m.cfg.optim, m.step, cfg.train.steps)


def _base(trainer, m, step: int) -> dict:
    row = {"step": step, "tokens": step * trainer.tokens_per_step, "width": m.width, "seed": m.seed}
    return row if m.base_lr is None else {**row, "base_lr": m.base_lr}


def write_lambda0(trainer) -> None:
    for m in trainer.members:
        if m.name in trainer.lambda0:
            trainer.writer.write({"kind": "lambda0", **_base(trainer, m, 0), "lambda0": trainer.lambda0[m.name],
                                  "lr": m.cfg.optim.lr, "lr_unit": trainer.cfg.optim.lr_unit,
                                  "lr_multiple": m.cfg.optim.lr * trainer.lambda0[m.name] / 2.0})


def batch_sharpness(m, x, y, kind: str, iters: int, tol: float, hvp: str, reduce=None) -> dict:
    """The row body: stats.sharpness.train_batch_sharpness on (x, y), and the same in units of the
    base step size. m holds whole parameters (parallel.stats.whole_member); (x, y) is this rank's
    share of the batch and reduce(tensors) averages over the ranks (Engine.batch_mean): the global
    batch's values."""
    row = train_batch_sharpness(m.model, m.optimizer, x, y, kind, iters=iters, tol=tol, hvp=hvp, seed=m.seed,
                                reduce=reduce)
    groups = [g for g in m.optimizer.param_groups if g["lr_mult"] > 0]
    eta = float(groups[0]["lr"]) / float(groups[0]["lr_mult"]) if groups else 0.0
    row["eta"] = eta
    if eta > 0:
        row.update(sharpness=row["precond_sharpness"] / eta, edge=row["threshold"] / eta)
    return row


def write_batch_sharpness(trainer, step: int, members: list, x, y) -> None:
    """batch_sharpness rows for `members` at `step` when stats.batch_sharpness_every is due."""
    cfg = trainer.cfg
    every = cfg.stats.batch_sharpness_every
    if not every or not (step % every == 0 or step == cfg.train.steps or step == 0):
        return
    which = "full" if cfg.train.full_batch else "online"
    for m in members:
        with whole_member(m) as whole:
            body = batch_sharpness(whole, x, y, cfg.train.loss, cfg.stats.batch_sharpness_iters,
                                   cfg.stats.sharpness_tol, cfg.stats.hvp, m.engine.batch_mean)
        trainer.writer.write({"kind": "batch_sharpness", **_base(trainer, m, step), "batch": which,
                              "batch_step": 0 if cfg.train.full_batch else max(step - 1, 0),
                              "batch_examples": len(x) * trainer.dist.world_size, **body})


def at_start(trainer, start: int) -> None:
    """λ0 rows and the sharpness at initialization, on the first training batch."""
    if start != 0:
        return
    write_lambda0(trainer)
    x, y = trainer.batch(0)
    write_batch_sharpness(trainer, 0, trainer.active(trainer.members), x, y)


# --------------------------------------------------------------------------- coordinate check in the loop

def init_coord(trainer) -> None:
    """stats.coord_every: snapshot W_0 and every layer's input/output on a fixed probe batch, at init."""
    from fastwidth.stats.coord import CoordTracker
    trainer.coord = {}
    if not trainer.cfg.stats.coord_every:
        return
    x = trainer.stream.probe()["x"][:64].to(trainer.device)
    for m in trainer.members:  # W_0 whole: 4P bytes per member kept (coord is for small widths)
        with whole_member(m) as whole:
            trainer.coord[m.name] = CoordTracker(whole.model, x)
        trainer.coord[m.name].model = None  # measured on the member's whole view of that step


def write_coord(trainer, step: int, members: list) -> None:
    """"coord" rows: per layer act_rms, delta_rms, own_rms (W_t - W_0)·x_t, input_rms W_0·(x_t - x_0)."""
    every = trainer.cfg.stats.coord_every
    if not every or not (step % every == 0 or step == trainer.cfg.train.steps):
        return
    for m in members:
        if m.name in trainer.coord:
            with whole_member(m) as whole:
                layers = trainer.coord[m.name].measure(whole.model)
            trainer.writer.write({"kind": "coord", **_base(trainer, m, step), "layers": layers})
