"""One optimizer step for every member of a stack (models/stacked.py), over the stacked tensors.

    if why_not(optimizers) is None:      # else the members step on their own
        step = StackedStep(params, member_params, optimizers)
    norms = step.clip(max_norm)     # (S,): each member's gradient norm before clipping
    step.step()                     # every member's Adam(W) update, one fused call per group

The members' optimizers keep their own state entries (step, exp_avg, exp_avg_sq): the moments
become views of (S, ...) tensors, one per stacked parameter, so state_dict, checkpoints and the
statistics that read the state see the same numbers as before. The update is torch's fused
Adam/AdamW kernel, the one the member optimizers run (param/optim.py builds them fused), called on
the stacked tensors once per parameter group where the members share the group's lr and weight
decay (seeds of one width), else once per member and group on its slices (sweep.lrs). It replaces
S Optimizer.step() calls and S clip_grad_norm_ calls, ~23% of a stacked step of the µP MLP.
Covered: Adam and AdamW with fused=True, amsgrad and maximize off; anything else (SGD, a sharded
or non-fused optimizer): why_not says why, and the members step on their own.
"""
from __future__ import annotations

import torch


def why_not(optimizers: list) -> str | None:
    """None when the members' optimizers can take one stacked step, else the reason in one line."""
    first = optimizers[0]
    if type(first) not in (torch.optim.Adam, torch.optim.AdamW):
        return f"{type(first).__name__} has no stacked step (Adam and AdamW do)"
    keys = ("betas", "eps", "amsgrad", "maximize", "fused", "decoupled_weight_decay")
    for opt in optimizers:
        if type(opt) is not type(first):
            return "the members' optimizers differ in class"
        if len(opt.param_groups) != len(first.param_groups):
            return "the members' optimizer groups differ"
        # group g of every member against group g of the first: the groups' ε differ (eps_mult)
        for g, lead in zip(opt.param_groups, first.param_groups):
            if not g.get("fused") or g.get("amsgrad") or g.get("maximize") or g.get("capturable"):
                return "an optimizer that is not fused Adam without amsgrad/maximize"
            if any(g.get(k) != lead.get(k) for k in keys):
                return "the members' betas or eps differ"
    return None


class StackedStep:
    """The clip and Adam(W) step of S members whose parameters are slices of `params`' tensors."""

    def __init__(self, params: dict[str, torch.Tensor], member_params: list[dict], optimizers: list):
        self.params, self.optimizers = params, optimizers
        self.S = len(optimizers)
        self.decoupled = isinstance(optimizers[0], torch.optim.AdamW) or optimizers[0].param_groups[0].get(
            "decoupled_weight_decay", False)
        # names[g]: the stacked names in member group g, in the group's parameter order
        index = {id(p): n for n, p in member_params[0].items()}
        self.names = [[index[id(p)] for p in g["params"]] for g in optimizers[0].param_groups]
        for mp, opt in zip(member_params, optimizers):
            if [[id(p) for p in g["params"]] for g in opt.param_groups] != [[id(mp[n]) for n in ns] for ns in self.names]:
                raise ValueError("the members' optimizer groups differ")
        self.exp_avg: dict[str, torch.Tensor] = {}
        self.exp_avg_sq: dict[str, torch.Tensor] = {}
        self.steps: dict[str, list[torch.Tensor]] = {}  # each name's step tensor in every member
        self.lead: dict[str, torch.Tensor] = {}  # member 0's (the kernel reads it; all are equal)
        for n, stacked in params.items():
            states = [opt.state[mp[n]] for mp, opt in zip(member_params, optimizers)]
            for st, p in zip(states, (mp[n] for mp in member_params)):
                if not st:  # before the first step: the state torch's fused Adam would create
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if len({float(st["step"]) for st in states}) != 1:
                raise ValueError("the members' optimizer steps differ")
            for key, into in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                into[n] = torch.stack([st[key] for st in states])  # (S, *shape)
                for i, st in enumerate(states):
                    st[key] = into[n][i]  # the member's state is a view of its slice
            self.steps[n] = [st["step"] for st in states]
            self.lead[n] = states[0]["step"]
        self.member_params = member_params

    def release(self) -> None:
        """The members' state owns its storage again (the stacked step is not used after this)."""
        for mp, opt in zip(self.member_params, self.optimizers):
            for p in mp.values():
                st = opt.state[p]
                for key in ("exp_avg", "exp_avg_sq"):
                    st[key] = st[key].clone()

    def clip(self, max_norm: float) -> torch.Tensor:
        """(S,) each member's global gradient norm before clipping; with max_norm > 0 each member's
        gradient is scaled by min(1, max_norm / (norm + 1e-6)), as clip_grad_norm_ does."""
        S = self.S
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        per = torch.stack([torch.linalg.vector_norm(g.reshape(S, -1), dim=1) for g in grads], 1)  # (S, P)
        norms = torch.linalg.vector_norm(per, dim=1)  # (S,)
        if max_norm > 0:
            coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.view(S, *([1] * (g.dim() - 1))).to(g.dtype))
        return norms

    def step(self) -> None:
        """Every member's update; the stacked gradients are cleared after it."""
        live = [n for n, p in self.params.items() if p.grad is not None]  # torch skips a parameter without one
        torch._foreach_add_([t for n in live for t in self.steps[n]], 1)
        kernel = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        groups = [opt.param_groups for opt in self.optimizers]
        for g, names in enumerate(self.names):
            names = [n for n in names if self.params[n].grad is not None]
            if not names:
                continue
            first = groups[0][g]  # group g's betas and ε (why_not: equal in every member)
            beta1, beta2 = first["betas"]
            hyper = dict(amsgrad=False, beta1=beta1, beta2=beta2, eps=first["eps"], maximize=False)
            if all(gs[g]["lr"] == first["lr"] and gs[g]["weight_decay"] == first["weight_decay"] for gs in groups):
                kernel([self.params[n].detach() for n in names], [self.params[n].grad for n in names],
                       [self.exp_avg[n] for n in names], [self.exp_avg_sq[n] for n in names], [],
                       [self.lead[n] for n in names], lr=first["lr"], weight_decay=first["weight_decay"], **hyper)
                continue
            for i, gs in enumerate(groups):  # the members' learning rates differ: each on its slices
                kernel([self.params[n].detach()[i] for n in names], [self.params[n].grad[i] for n in names],
                       [self.exp_avg[n][i] for n in names], [self.exp_avg_sq[n][i] for n in names], [],
                       [self.lead[n] for n in names], lr=gs[g]["lr"], weight_decay=gs[g]["weight_decay"], **hyper)
        for p in self.params.values():
            p.grad = None
