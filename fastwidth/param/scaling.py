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
    depth_mup, completep: mup and, with m_L = depth / base_depth and α = ½ or 1 (DESIGN §3,
                the CompleteP paper's Table 1), on a residual branch: output × m_L^-α, Adam LR
                × m_L^(α-1), ε × m_L^-α (Adam only)
    umup        u-µP (Blake et al. 2024) as the `unit-scaling` package builds it, absolute sizes:
                init N(0, σ²) for every matrix; forward 1/√fan_in (input, hidden), α/fan_in
                (readout); Adam LR × fan_in^-½ for input and hidden matrices (an embedding's
                "fan_in" is its width, unit_scaling.optim._get_fan_in), × depth^-½ on a residual
                branch, a linear layer's bias × its layer's forward scale (unit_scaling scales the
                bias with the matmul); each branch output × depth^-½ (what
                transformer_residual_scaling_rule's τ and the skip's renormalization amount to
                ahead of pre-norm blocks and a final norm)
    sp          σ/√fan_in everywhere, forward α on the readout, one LR
    ntk         N(0, σ²), forward 1/√fan_in on every matrix, one LR

param.init picks the distribution behind "init std" (the rows give its std and its name):
    normal  N(0, std²) for matrices, biases 0: σ/√fan_in is √3 times PyTorch's default std
    torch   PyTorch's default layer init put through the same table, which is what mup gives
            after set_base_shapes(model, base) on a model built with torch's defaults:
            matrices U(±b), b = the normal std above (nn.Linear/Conv kaiming_uniform(a=√5) has
            b = 1/√fan_in), so hidden matrices use their own fan_in and input/output ones the
            base width's; a layer's bias U(±1/√fan_in) with the layer's fan_in at base width
            under µP kinds (mup's rescale_linear_bias and MuReadout._rescale_parameters multiply
            by √m); the readout bias is 0 with a zero readout (MuReadout(readout_zero_init));
            embeddings N(0, embed_std²) (nn.Embedding: N(0, 1)); norm gains 1, shifts 0

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
from fastwidth.nn.roles import Init, Role

DEPTH_ALPHA = {"depth_mup": 0.5, "completep": 1.0}   # the residual branch exponent of each depth kind
MUP_KINDS = ("mup", "mean_field", *DEPTH_ALPHA)
UMUP = "umup"   # unit-scaled µP: its own rules (_umup_*), absolute fan_in and depth, no base shape
MATRIX_INITS = (Init.FAN_IN, Init.QUERY)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple
    role: str
    init: str           # normal | uniform | zeros | ones
    init_std: float     # the standard deviation of that distribution (a uniform's bound is √3 × it)
    lr_mult: float      # multiplies optim.lr
    wd_mult: float      # multiplies optim.weight_decay
    forward_mult: float # multiplies the layer's matmul output (bias excluded)
    eps_mult: float = 1.0     # multiplies optim.eps (Adam)
    branch_mult: float = 1.0  # on a residual branch: the multiplier on that branch's output; 1 elsewhere

    def row(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d


def width_mult(cfg: Config) -> float:
    return cfg.model.width / cfg.param.base_width


def depth_alpha(cfg: Config) -> float:
    """α of the residual branch multiplier m_L^-α: param.depth_alpha, else the kind's own; 0 for
    kinds without a depth rule."""
    if cfg.param.kind not in DEPTH_ALPHA:
        return 0.0
    a = cfg.param.depth_alpha
    return DEPTH_ALPHA[cfg.param.kind] if a is None else float(a)


def depth_mult(cfg: Config) -> float:
    """m_L = depth / base_depth."""
    return cfg.model.depth / cfg.param.base_depth


def branch_mult(cfg: Config) -> float:
    """The multiplier on every residual branch's output: m_L^-α (1.0 exactly at base depth and
    for kinds without a depth rule, so those models compute what they always did); umup:
    depth^-½, unit_scaling's default residual rule (tests/test_umup_oracle.py derives it)."""
    if cfg.param.kind == UMUP:
        return cfg.model.depth ** -0.5
    a = depth_alpha(cfg)
    return 1.0 if a == 0.0 else depth_mult(cfg) ** -a


def eps_scales_with_width(cfg: Config) -> bool:
    """optim.eps_scaling resolved: auto = width under the depth kinds and umup, none elsewhere."""
    mode = cfg.optim.eps_scaling
    if mode == "auto":
        return cfg.param.kind in (*DEPTH_ALPHA, UMUP)
    return mode == "width"  # config validation refuses width under sp and ntk


def fan_in(shape: tuple) -> int:
    return int(math.prod(shape[1:])) if len(shape) > 1 else 1


def _init(kind: str, role: Role, init: Init, shape: tuple, m: float, cfg: Config,
          layer: tuple[Role, tuple] | None = None) -> tuple[str, float]:
    p = cfg.param
    if init is Init.ZEROS:
        return "zeros", 0.0
    if init is Init.ONES:
        return "ones", 0.0
    if init is Init.EMBED:
        return "normal", p.embed_std
    if init is Init.BIAS:
        return _bias_init(kind, role, m, cfg, layer)
    if kind == UMUP:  # unit init for every matrix, the readout included (config refuses init=torch)
        return "normal", p.init_std
    if kind == "ntk":
        std = p.init_std
    else:
        std = p.init_std / math.sqrt(fan_in(shape))
        if kind in MUP_KINDS and role is Role.OUTPUT:
            # MuReadout: zero by default, else the base-width std (σ/√(fan_in/m) = σ·√m/√fan_in)
            if p.zero_readout:
                return "zeros", 0.0
            std = std * math.sqrt(m)
        if kind in MUP_KINDS and init is Init.QUERY and p.zero_query:
            return "zeros", 0.0
    if p.init == "torch":  # U(±b) with b the normal std: std b/√3 (kaiming_uniform(a=√5))
        return "uniform", std / math.sqrt(3.0)
    return "normal", std


def _bias_init(kind: str, role: Role, m: float, cfg: Config, layer: tuple[Role, tuple] | None) -> tuple[str, float]:
    """A layer's bias: 0 under init=normal; under torch nn.Linear's U(±1/√fan_in), its layer's
    fan_in taken at base width under µP kinds where that fan_in grows (hidden, output layers)."""
    if cfg.param.init != "torch":
        return "zeros", 0.0
    if layer is None:
        raise ValueError("a bias under param.init=torch needs its layer's (role, weight shape)")
    w_role, w_shape = layer
    fan = fan_in(w_shape)
    if kind in MUP_KINDS:
        if role is Role.FIXED and cfg.param.zero_readout:
            return "zeros", 0.0  # MuReadout(readout_zero_init=True) zeroes weight and bias
        if w_role in (Role.HIDDEN, Role.OUTPUT):
            fan = fan / m
    return "uniform", 1.0 / math.sqrt(fan) / math.sqrt(3.0)


def _forward_mult(kind: str, role: Role, init: Init, shape: tuple, m: float, cfg: Config) -> float:
    p = cfg.param
    if kind == UMUP and init in MATRIX_INITS:  # unit_scaling.functional.linear / linear_readout
        return p.output_mult / fan_in(shape) if role is Role.OUTPUT else 1.0 / math.sqrt(fan_in(shape))
    if role is Role.OUTPUT and init in MATRIX_INITS:
        if kind == "mup" or kind in DEPTH_ALPHA:
            return p.output_mult / m
        if kind == "mean_field":
            return p.output_mult / (m * p.gamma0)
        if kind == "ntk":
            return p.output_mult / math.sqrt(fan_in(shape))
        return p.output_mult
    if kind == "ntk" and init in MATRIX_INITS:
        return 1.0 / math.sqrt(fan_in(shape))
    return 1.0


def _lr_wd_mult(kind: str, role: Role, shape: tuple, m: float, cfg: Config, on_branch: bool = False,
                layer: tuple[Role, tuple] | None = None, m_out: float | None = None) -> tuple[float, float]:
    lr, wd = _lr_wd_coupled(kind, role, shape, m, cfg, on_branch, m_out)
    if kind == UMUP and layer is not None:
        # unit_scaling.functional.linear scales the bias with the matmul (output × 1/√fan_in);
        # fastwidth's multiplier leaves the bias out, so the same Adam steps on the bias's
        # contribution need its LR × that scale
        lr *= _forward_mult(kind, layer[0], Init.FAN_IN, layer[1], m, cfg)
    # independent decay (p × (1 - wd × wd_mult × schedule) a step, optim.set_lr) is width-free
    # as it stands: no factor, as unit_scaling.optim.scaled_parameters and u-µP apply none
    return lr, 1.0 if cfg.optim.weight_decay_mode == "independent" else wd


def _lr_wd_coupled(kind: str, role: Role, shape: tuple, m: float, cfg: Config, on_branch: bool,
                   m_out: float | None = None) -> tuple[float, float]:
    if kind == UMUP:  # unit_scaling.optim.lr_scale_func_adam (Adam only: config refuses sgd)
        lr = cfg.model.depth ** -0.5 if on_branch else 1.0
        return (lr / math.sqrt(fan_in(shape)), 1.0) if role in (Role.INPUT, Role.HIDDEN) else (lr, 1.0)
    if kind not in MUP_KINDS:
        return 1.0, 1.0
    if kind in DEPTH_ALPHA:  # Adam only (config validation refuses sgd)
        depth = depth_mult(cfg) ** (depth_alpha(cfg) - 1.0) if on_branch else 1.0
        return ((1.0 / m) * depth, m) if role is Role.HIDDEN else (depth, 1.0)
    sgd = cfg.optim.name == "sgd"
    if sgd:
        if role is Role.HIDDEN and m_out is not None and m_out != m:  # MuSGD: ÷ fanin_fanout_mult_ratio
            lr, wd = m_out / m, m / m_out
        elif role is Role.HIDDEN or role is Role.FIXED:
            lr, wd = 1.0, 1.0
        else:  # vector-like: input weights, biases, gains, readout
            lr, wd = m, 1.0 / m
    else:
        lr, wd = (1.0 / m, m) if role is Role.HIDDEN else (1.0, 1.0)
    if kind == "mean_field":
        g = cfg.param.gamma0
        lr *= g * g if sgd else g
    return lr, wd


def _eps_mult(m: float, cfg: Config, on_branch: bool) -> float:
    """ε × m_N^-1 where eps scales with width; × m_L^-α more on a residual branch under the depth kinds."""
    eps = 1.0 / m if eps_scales_with_width(cfg) else 1.0
    if on_branch and cfg.param.kind in DEPTH_ALPHA:
        eps *= depth_mult(cfg) ** -depth_alpha(cfg)
    return eps


def param_info(name: str, shape: tuple, role: Role, init: Init, cfg: Config,
               layer: tuple[Role, tuple] | None = None, on_branch: bool = False, m: float | None = None,
               m_out: float | None = None) -> ParamInfo:
    """One row of the table. `layer` = (role, weight shape) of the layer a bias belongs to;
    `on_branch`: the parameter sits on a residual branch (the model's branch_prefixes); `m`: the
    parameter's own width multiplier where it is not model.width / param.base_width (a user's
    model: mup's InfShape.width_mult, fastwidth.models.user); `m_out`: a hidden matrix's fan_out
    multiplier where it differs from m (an intermediate size rounded per width: MuSGD's LR ×
    m_out / m)."""
    kind, m = cfg.param.kind, (width_mult(cfg) if m is None else m)
    how, std = _init(kind, role, init, shape, m, cfg, layer)
    lr, wd = _lr_wd_mult(kind, role, tuple(shape), m, cfg, on_branch, layer, m_out)
    return ParamInfo(name=name, shape=tuple(shape), role=role.value, init=how, init_std=std,
                     lr_mult=lr, wd_mult=wd, forward_mult=_forward_mult(kind, role, init, shape, m, cfg),
                     eps_mult=_eps_mult(m, cfg, on_branch), branch_mult=branch_mult(cfg) if on_branch else 1.0)


def mup_table(model: nn.Module, cfg: Config) -> dict[str, ParamInfo]:
    """The side table for `model` (built for cfg.model.width). Every parameter must have a role."""
    table: dict[str, ParamInfo] = {}
    prefixes = tuple(model.branch_prefixes()) if hasattr(model, "branch_prefixes") else ()
    if hasattr(model, "param_roles"):  # a user's model: roles inferred (fastwidth.models.user)
        for name, p in model.named_parameters():
            s = model.param_roles()[name]
            info = param_info(name, tuple(p.shape), s.role, s.init, cfg, s.layer, name.startswith(prefixes), s.m,
                              s.m_out)
            table[name] = info if s.forward is None else dataclasses.replace(info, forward_mult=s.forward)
        return table
    for mod_name, mod in model.named_modules():
        if not hasattr(mod, "mup_roles"):
            continue
        roles = mod.mup_roles()
        for local, (role, init) in roles.items():
            p = getattr(mod, local)
            if p is None:
                continue
            name = f"{mod_name}.{local}" if mod_name else local
            layer = (roles["weight"][0], tuple(mod.weight.shape)) if init is Init.BIAS else None
            table[name] = param_info(name, tuple(p.shape), role, init, cfg, layer, name.startswith(prefixes))
    missing = [n for n, _ in model.named_parameters() if n not in table]
    if missing:
        raise TypeError(f"parameters without a µP role (build them with fastwidth.nn layers): {missing}")
    return table


def attention_scale(cfg: Config) -> float:
    """Softmax scale. µP kinds: attn_mult / head_dim, attn_mult defaulting to √(base head_dim)
    (umup: to 1, u-µP's attention mult); sp/ntk: √head_dim / head_dim, written the same way so
    both are bitwise equal at base width."""
    mc = cfg.model
    head_dim = mc.width // mc.n_heads if mc.n_heads else mc.head_dim
    if cfg.param.kind == UMUP:  # u-µP's attention: mult / head_dim, mult = 1 (unit_scaling)
        return (cfg.param.attn_mult or 1.0) / head_dim
    if cfg.param.kind in MUP_KINDS:
        base_hd = cfg.param.base_width // mc.n_heads if mc.n_heads else mc.head_dim
        attn_mult = cfg.param.attn_mult if cfg.param.attn_mult is not None else math.sqrt(base_hd)
    else:
        attn_mult = math.sqrt(head_dim)
    return attn_mult / head_dim


# Rows (dim 0) per independently seeded block of a draw. Any row range, or any range of the
# flattened tensor, can then be drawn alone: FSDP2 draws only its dim-0 shard and ZeRO-3 only its
# flat partition, and both equal the one-process tensor's slice. Changing it changes every draw.
INIT_BLOCK_ROWS = 64


def init_depth(cfg) -> int | None:
    """The depth init_seed takes: model.depth for a member of a depth sweep (sweep.depths), None
    elsewhere (every other run keeps its draws)."""
    return cfg.model.depth if cfg.sweep.depths else None


def init_seed(seed: int, width: int, name: str, block: int, depth: int | None = None) -> int:
    """The generator seed of one row block of one tensor. The width is part of it, so models of one
    seed at two widths are independent draws (a narrow model is not a slice of the wide one), for
    every param.kind alike (mup at base width still equals sp bit for bit). So is the depth of a
    depth sweep's member (init_depth; None leaves the seed as it always was): two depths of one
    seed are independent draws too, and a member equals itself trained in a one-depth sweep."""
    key = f"{seed}:{width}:{name}:{block}" if depth is None else f"{seed}:{width}:d{depth}:{name}:{block}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_init(info: ParamInfo, seed: int, width: int, rows: tuple[int, int] | None = None,
              depth: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of dim 0 of parameter `info`'s initial value (all rows by default), in
    fp32 on the CPU. Equal to the same rows of the full draw, whatever the range. depth: init_depth."""
    shape = tuple(info.shape)
    n_rows = shape[0] if shape else 1
    start, stop = rows if rows is not None else (0, n_rows)
    if not 0 <= start <= stop <= n_rows:
        raise ValueError(f"rows {start}:{stop} outside {info.name} of {n_rows} rows")
    row_shape = shape[1:]
    if info.init == "zeros":
        return torch.zeros((stop - start, *row_shape))
    if info.init == "ones":
        return torch.ones((stop - start, *row_shape))
    parts = []
    first, last = start // INIT_BLOCK_ROWS, (stop - 1) // INIT_BLOCK_ROWS if stop > start else -1
    for b in range(first, last + 1):
        b0, b1 = b * INIT_BLOCK_ROWS, min((b + 1) * INIT_BLOCK_ROWS, n_rows)
        g = torch.Generator().manual_seed(init_seed(seed, width, info.name, b, depth))
        block = _unit_draw(info.init, (b1 - b0, *row_shape), g)
        parts.append(block[max(start, b0) - b0: min(stop, b1) - b0])
    out = torch.cat(parts) if parts else torch.empty((0, *row_shape))
    out = out * info.init_std
    return out.reshape(shape) if not shape else out


def _unit_draw(how: str, shape: tuple, g: torch.Generator) -> torch.Tensor:
    """A unit-variance draw: N(0, 1), or U(-√3, √3) for "uniform"."""
    if how == "normal":
        return torch.randn(shape, generator=g, dtype=torch.float32)
    if how == "uniform":
        return (torch.rand(shape, generator=g, dtype=torch.float32) * 2.0 - 1.0) * math.sqrt(3.0)
    raise ValueError(f"unknown init distribution {how!r} (normal, uniform, zeros, ones)")


def draw_init_flat(info: ParamInfo, seed: int, width: int, start: int, stop: int,
                   depth: int | None = None) -> torch.Tensor:
    """Elements [start, stop) of the flattened initial value (a ZeRO-3 partition), drawing only the
    row blocks that overlap it."""
    row_len = max(1, math.prod(info.shape[1:])) if len(info.shape) > 1 else 1
    r0, r1 = start // row_len, -(-stop // row_len)
    flat = draw_init(info, seed, width, (r0, max(r0, r1)), depth).reshape(-1)
    return flat[start - r0 * row_len: stop - r0 * row_len]


@torch.no_grad()
def init_parameters(model: nn.Module, table: dict[str, ParamInfo], seed: int, width: int,
                    depth: int | None = None) -> None:
    """Draw every parameter from generators seeded by (seed, width, name, row block), on the CPU.

    Per-name generators make the draws independent of module order, of the zero-init options and
    of the device, so `mup` at base width equals `sp` bit for bit and a sharded model can be
    initialized shard by shard (draw_init with a row range).
    """
    for name, p in model.named_parameters():
        p.copy_(draw_init(table[name], seed, width, depth=depth).to(p.dtype))


def scales_layer_input(name: str, init: str, shape) -> bool:
    """Whether a parameter's forward multiplier is its layer's, applied to the layer's input (a
    drawn matrix's weight): W(αx) + b = (αW)x + b, so a user's model hooks it and an export folds it."""
    return name.endswith("weight") and init in ("normal", "uniform", "zeros") and len(shape) >= 2


def module_mults(table: dict[str, ParamInfo]) -> tuple[dict[str, float], float]:
    """({module name: forward multiplier of its matrix}, the residual branch multiplier) of a
    user's model: what UserModel.apply_mults hooks on, and what an export folds into weights."""
    mults = {n.rpartition(".")[0]: info.forward_mult for n, info in table.items()
             if scales_layer_input(n, info.init, info.shape)}
    branch = [info.branch_mult for info in table.values() if info.branch_mult != 1.0]
    return mults, branch[0] if branch else 1.0


def apply_forward_mults(model: nn.Module, table: dict[str, ParamInfo]) -> None:
    """Give each fastwidth.nn layer its forward multiplier (a plain float on the module); a user's
    model gets hooks (UserModel.apply_mults) for its layers' multipliers and its branch outputs'."""
    if hasattr(model, "apply_mults"):
        model.apply_mults(*module_mults(table))
        return
    for mod_name, mod in model.named_modules():
        if hasattr(mod, "mup_roles") and hasattr(mod, "mult"):
            key = f"{mod_name}.weight" if mod_name else "weight"
            mod.mult = float(table[key].forward_mult)


def table_rows(table: dict[str, ParamInfo]) -> list[dict]:
    return [info.row() for info in table.values()]

