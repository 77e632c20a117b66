"""Optimizer param groups from the µP table, and the LR schedule (owned here, nowhere else).

Each group carries its `lr_mult`, `wd_mult` and `eps_mult`; every step `set_lr` writes
    group["lr"] = optim.lr × lr_mult × schedule(step)
    group["eps"] = optim.eps × eps_mult
    group["weight_decay"] = optim.weight_decay × wd_mult                       (coupled)
                          = optim.weight_decay × wd_mult × schedule(step) / group["lr"]   (independent)
so neither a resumed optimizer state nor an engine's scheduler can overwrite the multipliers.
AdamW (torch's, fused or not; DeepSpeedCPUAdam's adamw_mode; the stacked step) multiplies p by
1 - lr × weight_decay each step: coupled, that is lr·wd (mup's rule); independent (unit scaling,
u-µP; Wortsman et al. 2023), wd × wd_mult × schedule whatever the LR. The AdamW timescale
τ = 1/(η λ) of each group (η its peak LR, λ its decay; independent: 1/λ_step) is `timescales`.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from fastwidth.config import Config, OptimConfig
from fastwidth.param.scaling import ParamInfo


def param_groups(model: nn.Module, table: dict[str, ParamInfo]) -> list[dict]:
    """One group per distinct (lr_mult, wd_mult, eps_mult), in first-seen parameter order."""
    buckets: dict[tuple[float, float, float], dict] = defaultdict(lambda: {"params": [], "names": []})
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        info = table[name]
        group = buckets[(info.lr_mult, info.wd_mult, info.eps_mult)]
        group["params"].append(p)
        group["names"].append(name)
    return [{**g, "lr_mult": lr, "wd_mult": wd, "eps_mult": eps} for (lr, wd, eps), g in buckets.items()]


def build_optimizer(model: nn.Module, table: dict[str, ParamInfo], cfg: Config) -> torch.optim.Optimizer:
    oc = cfg.optim
    groups = param_groups(model, table)
    if oc.name == "sgd":
        opt = torch.optim.SGD(groups, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)
    else:
        cls = torch.optim.AdamW if oc.name == "adamw" else torch.optim.Adam
        opt = cls(groups, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay,
                  fused=_can_fuse(model))
    set_lr(opt, cfg.optim, step=0, total_steps=cfg.train.steps)
    return opt


def _can_fuse(model: nn.Module) -> bool | None:
    """torch's fused Adam for plain float parameters on CPU or CUDA (3x faster than the
    per-tensor loop on a 2-core CPU for the demo's width-512 GPT: 127 vs 381 ms a step);
    sharded parameters (DTensor) keep the default implementation."""
    params = list(model.parameters())
    ok = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point()
             for p in params)
    return True if ok and params else None


def lr_factor(step: int, oc: OptimConfig, total_steps: int) -> float:
    """schedule(t) for the optimizer step with index `step` (0-based)."""
    if oc.warmup_steps and step < oc.warmup_steps:
        return (step + 1) / oc.warmup_steps
    if oc.schedule == "constant":
        return 1.0
    horizon = (oc.decay_steps or total_steps) - oc.warmup_steps
    frac = min(max(step - oc.warmup_steps, 0) / max(horizon, 1), 1.0)
    if oc.schedule == "linear":
        shape = 1.0 - frac
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * frac))
    return oc.min_lr_ratio + (1.0 - oc.min_lr_ratio) * shape


def set_lr(opt: torch.optim.Optimizer, oc: OptimConfig, step: int, total_steps: int) -> float:
    """Write every group's lr and weight decay for `step`; returns the schedule factor."""
    factor = lr_factor(step, oc, total_steps)
    for g in opt.param_groups:
        g["lr"] = oc.lr * g["lr_mult"] * factor
        g["weight_decay"] = oc.weight_decay * g["wd_mult"]
        if oc.weight_decay_mode == "independent":  # lr × weight_decay = wd × wd_mult × factor
            g["weight_decay"] = g["weight_decay"] * factor / g["lr"] if g["lr"] > 0 else 0.0
        if "eps" in g:
            g["eps"] = oc.eps * g.get("eps_mult", 1.0)
    return factor


def timescales(table: dict[str, ParamInfo], oc: OptimConfig) -> list[dict]:
    """Each optimizer group's AdamW timescale in steps: τ = 1/(η λ) with η = optim.lr × lr_mult
    (the peak LR) and λ = weight_decay × wd_mult when coupled; τ = 1/λ_step, λ_step =
    weight_decay × wd_mult, when independent. null without decay.
    One row per (lr_mult, wd_mult, eps_mult), as param_groups groups."""
    groups: dict[tuple[float, float, float], list[str]] = defaultdict(list)
    for name, info in table.items():
        groups[(info.lr_mult, info.wd_mult, info.eps_mult)].append(name)
    rows = []
    for (lr_mult, wd_mult, eps_mult), names in groups.items():
        lr, wd = oc.lr * lr_mult, oc.weight_decay * wd_mult
        per_step = wd if oc.weight_decay_mode == "independent" else lr * wd
        rows.append({"params": len(names), "first": names[0], "lr": lr, "weight_decay": wd,
                     "eps": oc.eps * eps_mult, "tau": 1.0 / per_step if per_step > 0 else None})
    return rows
