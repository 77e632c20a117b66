"""Rows measured on the training batch and at init while training: batch sharpness, λ0, coord.

    sharpness = BatchSharpnessRows(cfg, world, lambda0)         # lambda0: trainer/dynamics.apply_edge_lrs
    sharpness.at_start(writer, members, active, x, y)          # λ0 rows, the sharpness at init (step 0)
    sharpness.after_step(writer, step, tokens, members, x, y)  # "batch_sharpness" rows when due
    coord = CoordRows(cfg, members, probe_x, device)           # W_0 and the layers' inputs at init
    coord.after_step(writer, step, tokens, members)            # "coord" rows when due

Neither receives the trainer: each gets the config, the writer, the members, the batch and the
rank count (world). Both measure each member whole (stats/ranks.py whole_member: the engine's
gathered view, a replica under FSDP2 / ZeRO-3), so every rank runs the same collectives.

Sharpness on the training batch. With full_batch the batch is the fixed one every step trains on
(gradient descent); online it is the batch the step just trained on ("a recent training batch"),
not the probe. The quantity is the top eigenvalue λ of P^{1/2} H P^{1/2}, P the optimizer's
per-parameter step sizes (stats/sharpness.py), by Lanczos. Rows give it in units of the base
step size η_t (the base lr times the schedule): sharpness = λ / η_t, to be read against
edge = threshold / η_t, which is 2/η for plain gradient descent. Under SP with SGD, P = η I and
sharpness is λ_max(H) itself; under µP, P = η D with D the per-group lr multipliers, and
sharpness is λ_max(D^{1/2} H D^{1/2}), the curvature in µP's own metric. Adam: P = η/(√v̂+ε)
and the edge is (2+2β1)/(1-β1)/η (Cohen et al. 2022). Each rank's (x, y) is its share of the
global batch; the HVPs are averaged over the ranks (the engine's batch_mean).

λ0 (optim.lr_unit = edge, trainer/dynamics.py) is that sharpness at initialization with P = D;
its rows say which multiple of 2/λ0 each member's learning rate is.
"""
from __future__ import annotations

from fastwidth.stats.coord import CoordTracker
from fastwidth.stats.lr_groups import member_tags
from fastwidth.stats.ranks import whole_member
from fastwidth.stats.sharpness import train_batch_sharpness

COORD_PROBE = 64   # probe examples the coord rows measure the layers on (coord is for small widths)


def row_base(m, step: int, tokens: int) -> dict:
    """The keys every per-member row of these starts with (base_lr in a learning-rate sweep, depth
    in a depth sweep: lr_groups.member_tags)."""
    return {"step": step, "tokens": tokens, "width": m.width, "seed": m.seed, **member_tags(m)}


def batch_sharpness(m, x, y, kind: str, iters: int, tol: float, hvp: str, reduce=None) -> dict:
    """The row body: stats.sharpness.train_batch_sharpness on (x, y), and the same in units of the
    base step size. m holds whole parameters (whole_member); (x, y) is this rank's share of the
    batch and reduce(tensors) averages over the ranks (the engine's batch_mean): the global
    batch's values."""
    row = train_batch_sharpness(m.model, m.optimizer, x, y, kind, iters=iters, tol=tol, hvp=hvp, seed=m.seed,
                                reduce=reduce)
    groups = [g for g in m.optimizer.param_groups if g["lr_mult"] > 0]
    eta = float(groups[0]["lr"]) / float(groups[0]["lr_mult"]) if groups else 0.0
    row["eta"] = eta
    if eta > 0:
        row.update(sharpness=row["precond_sharpness"] / eta, edge=row["threshold"] / eta)
    return row


def _due(step: int, every: int, steps: int) -> bool:
    return bool(every) and (step % every == 0 or step == steps)


def sharpness_due(step: int, every: int, dense: int, steps: int) -> bool:
    """Whether a batch_sharpness row is due after `step`: every step up to `dense`
    (stats.batch_sharpness_dense: onsets and catapults resolved step by step), then at
    stats.batch_sharpness_every (and the last step); nothing when both are 0."""
    return (0 <= step <= dense and dense > 0) or _due(step, every, steps)


class BatchSharpnessRows:
    """"batch_sharpness" rows at every step up to stats.batch_sharpness_dense, then at
    stats.batch_sharpness_every (and step 0 when either is on), "lambda0" rows at the
    start. world: the data-parallel ranks sharing each batch; lambda0: {member name: λ0} of the
    members whose learning rates are in units of 2/λ0 (empty otherwise)."""

    def __init__(self, cfg, world: int, lambda0: dict, whole_of=whole_member):
        self.cfg, self.world, self.lambda0, self.whole_of = cfg, world, dict(lambda0), whole_of

    def at_start(self, writer, members: list, active: list, x, y) -> None:
        """λ0 rows of `members` and the sharpness at initialization of `active`, on the first batch."""
        for m in members:
            if m.name in self.lambda0:
                lam0 = self.lambda0[m.name]
                writer.write({"kind": "lambda0", **row_base(m, 0, 0), "lambda0": lam0, "lr": m.cfg.optim.lr,
                              "lr_unit": self.cfg.optim.lr_unit, "lr_multiple": m.cfg.optim.lr * lam0 / 2.0})
        self.after_step(writer, 0, 0, active, x, y)

    def after_step(self, writer, step: int, tokens: int, members: list, x, y) -> None:
        """batch_sharpness rows for `members` at `step` when due; (x, y) this rank's share of the
        batch the step trained on."""
        cfg = self.cfg
        sc = cfg.stats
        if not sharpness_due(step, sc.batch_sharpness_every, sc.batch_sharpness_dense, cfg.train.steps):
            return
        which = "full" if cfg.train.full_batch else "online"
        for m in members:
            with self.whole_of(m) as whole:
                body = batch_sharpness(whole, x, y, cfg.train.loss, cfg.stats.batch_sharpness_iters,
                                       cfg.stats.sharpness_tol, cfg.stats.hvp, m.engine.batch_mean)
            writer.write({"kind": "batch_sharpness", **row_base(m, step, tokens), "batch": which,
                          "batch_step": 0 if cfg.train.full_batch else max(step - 1, 0),
                          "batch_examples": len(x) * self.world, **body})


class CoordRows:
    """stats.coord_every: "coord" rows, per layer act_rms, delta_rms, own_rms (W_t - W_0)·x_t and
    input_rms W_0·(x_t - x_0) (stats/coord.py CoordTracker), on the probe's first COORD_PROBE
    examples; W_0 is each member's whole weights when it was added (at init)."""

    def __init__(self, cfg, members: list, probe_x, device, whole_of=whole_member):
        self.cfg, self.whole_of = cfg, whole_of
        self.x = probe_x[:COORD_PROBE].to(device) if cfg.stats.coord_every else None
        self.trackers: dict = {}
        self.add(members)

    def add(self, members: list) -> None:
        """Snapshot W_0 and every layer's input/output of `members` (at their init)."""
        if self.x is None:
            return
        for m in members:  # W_0 whole: 4P bytes per member kept (coord is for small widths)
            with self.whole_of(m) as whole:
                self.trackers[m.name] = CoordTracker(whole.model, self.x)
            self.trackers[m.name].model = None  # measured on the member's whole view of that step

    def after_step(self, writer, step: int, tokens: int, members: list) -> None:
        if not _due(step, self.cfg.stats.coord_every, self.cfg.train.steps):
            return
        for m in members:
            if m.name in self.trackers:
                with self.whole_of(m) as whole:
                    layers = self.trackers[m.name].measure(whole.model)
                writer.write({"kind": "coord", **row_base(m, step, tokens), "layers": layers})
