"""µP as data: the one table that turns (kind, role, width) into init, LR, WD and forward multipliers.

Width multiplier m = width / base_width. `mup` follows microsoft/mup exactly (MuReadout +
MuAdam/MuSGD): MuAdam divides the LR of matrix-like (two width dims) params by their fan_in
multiplier and multiplies their (coupled) weight decay by it; MuSGD multiplies the LR of
vector-like params (one width dim: input weights, biases, gains, the readout) by m and divides
their weight decay by m; MuReadout multiplies the readout by output_mult / m.

    kind        role    init std              forward     Adam LR   SGD LR
    mup         input   σ/√fan_in (fixed)     1           η         η·m
                vector  const (0 or 1)        1           η         η·m
                hidden  σ/√fan_in             1           η/m       η
                output  0 or σ/√(fan_in/m)    α/m         η         η·m
                fixed   const                 1           η         η
    mean_field  = mup, output ÷γ0 and every LR ×γ0 (Adam) or ×γ0² (SGD); γ0 = 1 is mup
    sp          σ/√fan_in everywhere, forward α on the readout, one LR
    ntk         N(0, σ²), forward 1/√fan_in on every matrix, one LR

The metadata lives in this side table keyed by parameter name and computed from global shapes,
never as attributes on Parameters (lost under FSDP2, ZeRO-3, torch.compile and torch.save).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from fastwidth.config import Config
from fastwidth.param.roles import Init, Role

MUP_KINDS = ("mup", "mean_field")
MATRIX_INITS = (Init.FAN_IN, Init.QUERY)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple
    role: str
    init: str           # normal | zeros | ones
    init_std: float
    lr_mult: float      # multiplies optim.lr
    wd_mult: float      # multiplies optim.weight_decay
    forward_mult: float # multiplies the layer's matmul output (bias excluded)

    def row(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d


def width_mult(cfg: Config) -> float:
    return cfg.model.width / cfg.param.base_width


def fan_in(shape: tuple) -> int:
    return int(math.prod(shape[1:])) if len(shape) > 1 else 1


def _init(kind: str, role: Role, init: Init, shape: tuple, m: float, cfg: Config) -> tuple[str, float]:
    p = cfg.param
    if init is Init.ZEROS:
        return "zeros", 0.0
    if init is Init.ONES:
        return "ones", 0.0
    if init is Init.EMBED:
        return "normal", p.embed_std
    if kind == "ntk":
        return "normal", p.init_std
    std = p.init_std / math.sqrt(fan_in(shape))
    if kind in MUP_KINDS:
        if role is Role.OUTPUT:
            # MuReadout: zero by default, else the base-width std (σ/√(fan_in/m) = σ·√m/√fan_in)
            return ("zeros", 0.0) if p.zero_readout else ("normal", std * math.sqrt(m))
        if init is Init.QUERY and p.zero_query:
            return "zeros", 0.0
    return "normal", std


def _forward_mult(kind: str, role: Role, init: Init, shape: tuple, m: float, cfg: Config) -> float:
    p = cfg.param
    if role is Role.OUTPUT and init in MATRIX_INITS:
        if kind == "mup":
            return p.output_mult / m
        if kind == "mean_field":
            return p.output_mult / (m * p.gamma0)
        if kind == "ntk":
            return p.output_mult / math.sqrt(fan_in(shape))
        return p.output_mult
    if kind == "ntk" and init in MATRIX_INITS:
        return 1.0 / math.sqrt(fan_in(shape))
    return 1.0


def _lr_wd_mult(kind: str, role: Role, m: float, cfg: Config) -> tuple[float, float]:
    if kind not in MUP_KINDS:
        return 1.0, 1.0
    sgd = cfg.optim.name == "sgd"
    if sgd:
        if role is Role.HIDDEN or role is Role.FIXED:
            lr, wd = 1.0, 1.0
        else:  # vector-like: input weights, biases, gains, readout
            lr, wd = m, 1.0 / m
    else:
        lr, wd = (1.0 / m, m) if role is Role.HIDDEN else (1.0, 1.0)
    if kind == "mean_field":
        g = cfg.param.gamma0
        lr *= g * g if sgd else g
    return lr, wd


def param_info(name: str, shape: tuple, role: Role, init: Init, cfg: Config) -> ParamInfo:
    kind, m = cfg.param.kind, width_mult(cfg)
    how, std = _init(kind, role, init, shape, m, cfg)
    lr, wd = _lr_wd_mult(kind, role, m, cfg)
    return ParamInfo(name=name, shape=tuple(shape), role=role.value, init=how, init_std=std,
                     lr_mult=lr, wd_mult=wd, forward_mult=_forward_mult(kind, role, init, shape, m, cfg))


def mup_table(model: nn.Module, cfg: Config) -> dict[str, ParamInfo]:
    """The side table for `model` (built for cfg.model.width). Every parameter must have a role."""
    table: dict[str, ParamInfo] = {}
    for mod_name, mod in model.named_modules():
        if not hasattr(mod, "mup_roles"):
            continue
        for local, (role, init) in mod.mup_roles().items():
            p = getattr(mod, local)
            if p is None:
                continue
            name = f"{mod_name}.{local}" if mod_name else local
            table[name] = param_info(name, tuple(p.shape), role, init, cfg)
    missing = [n for n, _ in model.named_parameters() if n not in table]
    if missing:
        raise TypeError(f"parameters without a µP role (build them with fastwidth.nn layers): {missing}")
    return table


def attention_scale(cfg: Config) -> float:
    """Softmax scale. µP kinds: attn_mult / head_dim, attn_mult defaulting to √(base head_dim);
    sp/ntk: √head_dim / head_dim, written the same way so both are bitwise equal at base width."""
    mc = cfg.model
    head_dim = mc.width // mc.n_heads if mc.n_heads else mc.head_dim
    if cfg.param.kind in MUP_KINDS:
        base_hd = cfg.param.base_width // mc.n_heads if mc.n_heads else mc.head_dim
        attn_mult = cfg.param.attn_mult if cfg.param.attn_mult is not None else math.sqrt(base_hd)
    else:
        attn_mult = math.sqrt(head_dim)
    return attn_mult / head_dim


def _stable_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_parameters(model: nn.Module, table: dict[str, ParamInfo], seed: int) -> None:
    """Draw every parameter from its own generator seeded by (seed, name), on the CPU.

    One generator per name makes the draws independent of module order, of the zero-init
    options and of the device, so `mup` at base width equals `sp` bit for bit and a sharded
    model can be initialized tensor by tensor.
    """
    for name, p in model.named_parameters():
        info = table[name]
        if info.init == "zeros":
            p.zero_()
        elif info.init == "ones":
            p.fill_(1.0)
        else:
            g = torch.Generator().manual_seed(_stable_seed(seed, name))
            draw = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_((draw * info.init_std).to(p.dtype))


def apply_forward_mults(model: nn.Module, table: dict[str, ParamInfo]) -> None:
    """Give each fastwidth.nn layer its forward multiplier (a plain float on the module)."""
    for mod_name, mod in model.named_modules():
        if hasattr(mod, "mup_roles") and hasattr(mod, "mult"):
            key = f"{mod_name}.weight" if mod_name else "weight"
            mod.mult = float(table[key].forward_mult)


def table_rows(table: dict[str, ParamInfo]) -> list[dict]:
    return [info.row() for info in table.values()]


def table_from_rows(rows: list[dict]) -> dict[str, ParamInfo]:
    return {r["name"]: ParamInfo(**{**r, "shape": tuple(r["shape"])}) for r in rows}
