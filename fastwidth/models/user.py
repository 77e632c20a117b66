"""A user's module family as a fastwidth model: µP roles inferred from two widths, and the adapter the loop trains.

    make = resolve_factory(cfg)                      # model.factory "pkg.mod:fn", or fastwidth.train(model=fn)
    model = build(cfg, io)                           # a UserModel around make(width[, depth])
    model.param_roles()                              # {name: RoleSpec}: what mup_table reads

Which dimensions of a parameter grow with width is read as microsoft/mup's make_base_shapes reads
it: the family is built (on the meta device, no memory) at param.base_width and at twice it, and
each parameter's shapes are compared. Dimension 0 of a matrix is its fan_out, the rest its fan_in
(torch's layout; nn.Embedding's (num, dim) is read as fan_out = dim). The role then follows
mup's rule (both grow: hidden; only fan_in: output, the readout; only fan_out or a vector with a
growing dimension: input / vector; none: fixed), and the width multiplier of each parameter is
its own, mup's InfShape.width_mult: the last growing dimension's size over its size at base
width (so intermediate sizes rounded per width get what mup gives them).
`param.roles` overrides the inference per fnmatch pattern ("role" or "role:init"). A (num, dim)
table read by index looks like a readout by its shape alone: nn.Embedding, or a module class named
like one (fastwidth's MuEmbedding), is read as the input it is; two matrices that both read as
readouts are refused with the param.roles fix. A hidden matrix whose fan_out multiplier differs
from its fan_in one (an intermediate size rounded per width) keeps both: MuSGD's LR is m_out / m.

A model prepared with microsoft/mup (MuReadout and set_base_shapes in the factory; set_base_shapes
and its rescale run on the meta device) is read from its parameters' .infshape instead (RoleSpec.how
"mup"): ninf 2 hidden, 1 vector-like (a MuReadout's weight: output), 0 fixed, its own width_mult;
MuReadout applies its own output_mult / width_mult (the table reports it, no hook is added), with
width_mult kept on the module since materializing or sharding replaces the parameter and its infshape.

The adapter does not rename anything: it shares the user module's parameter, buffer and child
dictionaries, so every parameter keeps the user's name (the µP table's keys, the checkpoint's and
the exported state dict's), and every engine that replaces parameters (to_empty, FSDP2, ZeRO-3)
replaces them where the user's forward reads them. Forward multipliers (µP's readout α/m, ntk's
1/√fan_in) scale the input of the layer that owns the matrix (W(αx) + b = αWx + b for the linear
layers they are allowed on), or are set as the `mult` a fastwidth.nn layer carries (fastwidth's own
GPT through model=: applied once, never hooked as well); the depth kinds' branch multiplier scales a
branch's output.
"""
from __future__ import annotations

import fnmatch
import importlib
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastwidth.config import Config
from fastwidth.errors import ConfigError
from fastwidth.models.base import WidthModel
from fastwidth.nn.roles import Init, Role

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # y = W x + b: a forward multiplier can ride on x
DEPTH_KINDS = ("depth_mup", "completep", "umup")   # the kinds with a residual-branch rule
_IN_PROCESS: dict[str, object] = {}   # factories handed to fastwidth.train(model=...), keyed by their spec


@dataclass(frozen=True)
class RoleSpec:
    """One parameter's µP role as the table needs it."""
    role: Role
    init: Init
    m: float                                  # its own width multiplier (mup's InfShape.width_mult)
    layer: tuple[Role, tuple] | None = None   # a bias: its layer's (weight role, weight shape)
    how: str = "inferred"                     # inferred | override | mup (read from mup's infshapes)
    m_out: float | None = None                # a matrix's fan_out multiplier (mup's MuSGD: LR × m_out / m)
    forward: float | None = None              # a multiplier the module applies itself (mup.MuReadout's
                                              # output_mult / width_mult): the table reports it, no hook is added


# --------------------------------------------------------------------------- the factory

def register_factory(make) -> str:
    """The model.factory spec for a callable handed to fastwidth.train(model=make): its importable
    "module:qualname" when it has one (so a resumed or launched run finds it again), else
    "<python>:name", which only this process can build."""
    mod, qual = getattr(make, "__module__", None), getattr(make, "__qualname__", "")
    importable = mod not in (None, "__main__") and "<" not in qual
    spec = f"{mod}:{qual}" if importable else f"<python>:{getattr(make, '__name__', 'model')}"
    _IN_PROCESS[spec] = make
    return spec


def resolve_factory(spec: str):
    """The callable behind model.factory; one line naming what is wrong otherwise."""
    if spec in _IN_PROCESS:
        return _IN_PROCESS[spec]
    if not spec:
        raise ConfigError("model.arch=python needs model.factory: \"package.module:function\" returning the "
                          "nn.Module at a width (or pass model=make to fastwidth.train)")
    if spec.startswith("<python>:"):
        raise ConfigError(f"model.factory {spec} was a function defined in another process's __main__, which this "
                          f"process cannot build again (to resume or load the run); define it in an importable "
                          f"module and set model.factory: \"package.module:function\"")
    if ":" not in spec:
        raise ConfigError(f"model.factory {spec!r}: write \"package.module:function\"")
    mod_name, _, qual = spec.partition(":")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"model.factory {spec}: cannot import {mod_name} ({e})") from None
    for part in qual.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"model.factory {spec}: {mod_name} has no {qual}")
    if not callable(obj):
        raise ConfigError(f"model.factory {spec} is not callable")
    return obj


def call_factory(make, width: int, depth: int) -> nn.Module:
    """make(width) or make(width, depth), as its signature takes it; refuses a non-Module."""
    try:
        n = len([p for p in inspect.signature(make).parameters.values()
                 if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
    except (TypeError, ValueError):
        n = 1
    model = make(width, depth) if n >= 2 else make(width)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the model factory returned {type(model).__name__} at width {width}, not an nn.Module")
    return model


# --------------------------------------------------------------------------- role inference

def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, local = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), local


def _is_norm(mod: nn.Module) -> bool:
    return "norm" in type(mod).__name__.lower()


def _is_embedding(mod: nn.Module) -> bool:
    """nn.Embedding or a module class named like one (a (num, dim) table read by index, whose
    shape alone reads like a readout's)."""
    return isinstance(mod, nn.Embedding) or "embed" in type(mod).__name__.lower()
def _shape(p: torch.Tensor) -> tuple:
    """A parameter's whole shape: under ZeRO-3 (deepspeed.zero.Init) p.shape is the local flat
    partition and ds_shape the whole one."""
    return tuple(getattr(p, "ds_shape", p.shape))


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {n: _shape(p) for n, p in model.named_parameters()}


def _override(name: str, overrides: dict) -> tuple[Role, Init | None] | None:
    for pattern, value in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            role, _, init = str(value).partition(":")
            try:
                return Role(role), (Init(init) if init else None)
            except ValueError:
                raise ConfigError(f"param.roles {pattern!r}: {value!r} is not role[:init] (roles "
                                  f"{', '.join(r.value for r in Role)}; inits {', '.join(i.value for i in Init)})") from None
    return None


def infer_roles(model: nn.Module, base: nn.Module, delta: nn.Module, overrides: dict | None = None) -> dict[str, RoleSpec]:
    """{parameter name: RoleSpec} of `model` from its family built at base width (`base`) and at a
    second width (`delta`). Raises ConfigError naming the parameter that cannot be read."""
    overrides = overrides or {}
    shapes, s0, s1 = _shapes(model), _shapes(base), _shapes(delta)
    if set(s0) != set(s1) or set(s0) != set(shapes):
        odd = sorted(set(s0) ^ set(s1) | set(s0) ^ set(shapes))
        raise ConfigError(f"the model's parameters differ between widths (e.g. {odd[0]}): a width family must have "
                          f"the same parameter names at every width")
    specs: dict[str, RoleSpec] = {}
    for name, shape in shapes.items():
        a, b = s0[name], s1[name]
        if len(a) != len(b):
            raise ConfigError(f"parameter {name} has {len(a)} dimensions at one width and {len(b)} at another")
        grow = [i for i in range(len(a)) if a[i] != b[i]]
        ratios = {b[i] / a[i] for i in grow}
        forced = _override(name, overrides)
        if len(ratios) > 1 and forced is None:
            raise ConfigError(f"parameter {name}: dimensions {grow} grow by different ratios "
                              f"({', '.join(f'{a[i]}->{b[i]}' for i in grow)}); µP needs one width per parameter "
                              f"(or name its role with param.roles)")
        m = shape[grow[-1]] / a[grow[-1]] if grow else 1.0
        owner, local = _owner(model, name)
        role, init = _read_role(name, owner, local, shape, grow)
        role, init, layer = _settle(name, owner, local, shape, role, init, forced, specs)
        m_out = shape[0] / a[0] if len(shape) >= 2 and 0 in grow else None
        specs[name] = RoleSpec(role, init, m, layer, "override" if forced is not None else "inferred", m_out)
    _check_readout(model, specs)
    return specs


def _settle(name: str, owner: nn.Module, local: str, shape: tuple, role: Role, init: Init | None,
            forced: tuple[Role, Init | None] | None, specs: dict[str, RoleSpec]) -> tuple[Role, Init, tuple | None]:
    """(role, init, bias layer) after param.roles' override; refuses a parameter whose init is unknown."""
    if forced is not None:
        role, init = forced[0], forced[1] or init
    if init is None:
        raise ConfigError(f"parameter {name} ({type(owner).__name__}.{local}, shape {list(shape)}): its init cannot "
                          f"be inferred; name it with param.roles {{\"{name}\": \"{role.value}:zeros|ones|fan_in\"}}")
    layer = None
    if init is Init.BIAS:
        wname = f"{name.rpartition('.')[0]}.weight".lstrip(".")
        layer = (specs[wname].role if wname in specs else Role.HIDDEN, _shape(owner.weight))
    return role, init, layer


def _check_readout(model: nn.Module, specs: dict[str, RoleSpec]) -> None:
    """One readout: refuses a tied one, none, or several matrices that read as one."""
    outs = [n for n, s in specs.items() if s.role is Role.OUTPUT and s.init in (Init.FAN_IN, Init.QUERY)]
    if len(outs) > 1:
        raise ConfigError(f"{len(outs)} matrices read as readouts ({', '.join(outs[:3])}): only their fan_in grows; "
                          f"name the true one with param.roles {{\"<readout weight>\": \"output\"}} and the others "
                          f"(e.g. an embedding of your own class) {{\"<name>\": \"input:embed\"}}")
    if readout_module(model, specs) is None:
        tied = [n for n, mod in model.named_modules()
                if isinstance(getattr(mod, "weight", None), torch.Tensor) and f"{n}.weight".lstrip(".") not in specs]
        if tied:
            raise ConfigError(f"{tied[0]} shares its matrix with another layer (a tied readout): model.arch python / hf "
                              f"take an untied readout (e.g. tie_word_embeddings=False)")
        raise ConfigError("no readout found: no parameter's fan_in alone grows with width (a readout maps the width "
                          "to the outputs); name it with param.roles {\"<readout weight>\": \"output\"}")


# --------------------------------------------------------------------------- mup-prepared models

def _mup_readout_type():
    try:
        from mup import MuReadout
    except ImportError:  # mup not installed: no parameter can carry its infshape
        return None
    return MuReadout


def mup_prepared(model: nn.Module) -> bool:
    """True when microsoft/mup's set_base_shapes has run on the model (its parameters carry .infshape)."""
    params = list(model.parameters())
    return bool(params) and all(hasattr(p, "infshape") for p in params)


def _roles_from_infshapes(model: nn.Module, overrides: dict) -> dict[str, RoleSpec]:
    """Roles as mup reads them: ninf 2 hidden, 1 vector-like (a MuReadout's weight: output; a
    matrix whose fan_out grows: input), 0 fixed; m = InfShape.width_mult(), the fan_out's for
    MuSGD; MuReadout's own multiplier output_mult / width_mult kept (no hook added)."""
    mu_readout = _mup_readout_type()
    specs: dict[str, RoleSpec] = {}
    for name, p in model.named_parameters():
        inf = p.infshape
        grow = [i for i, d in enumerate(inf) if d.isinf()]
        owner, local = _owner(model, name)
        role, init = _read_role(name, owner, local, _shape(p), grow)
        forward = None
        if mu_readout is not None and isinstance(owner, mu_readout):
            role = Role.OUTPUT if local == "weight" else role
            forward = owner.output_mult / inf.width_mult() if local == "weight" else None
        forced = _override(name, overrides)
        role, init, layer = _settle(name, owner, local, _shape(p), role, init, forced, specs)
        m_out = inf[0].width_mult() if len(inf) >= 2 and inf[0].isinf() else None
        specs[name] = RoleSpec(role, init, float(inf.width_mult()), layer, "override" if forced is not None else "mup",
                               m_out, forward)
    _check_readout(model, specs)
    return specs


def _read_role(name: str, owner: nn.Module, local: str, shape: tuple, grow: list[int]) -> tuple[Role, Init | None]:
    if _is_embedding(owner) and local == "weight" and len(shape) == 2:
        return (Role.INPUT if grow == [1] else Role.HIDDEN if len(grow) == 2 else Role.FIXED), Init.EMBED
    if len(shape) >= 2:
        fan_out, fan_in = 0 in grow, any(i >= 1 for i in grow)
        role = {(True, True): Role.HIDDEN, (False, True): Role.OUTPUT,
                (True, False): Role.INPUT, (False, False): Role.FIXED}[(fan_out, fan_in)]
        return role, Init.FAN_IN
    role = Role.VECTOR if grow else Role.FIXED
    if local == "bias" and isinstance(getattr(owner, "weight", None), torch.Tensor) and len(_shape(owner.weight)) >= 2:
        return role, Init.BIAS
    if _is_norm(owner):
        return role, Init.ONES if local == "weight" else Init.ZEROS if local == "bias" else None
    return role, None


def readout_module(model: nn.Module, specs: dict[str, RoleSpec]) -> str | None:
    """The name of the module whose matrix is the readout: the owner of the output-role weight, or
    a linear layer sharing a matrix (a tied readout) whose fan_in alone grows."""
    for name, s in specs.items():
        if s.role is Role.OUTPUT and name.endswith("weight") and len(_shape(_owner(model, name)[0].weight)) >= 2:
            return name.rpartition(".")[0]
    return None


# --------------------------------------------------------------------------- the adapter

class UserModel(WidthModel):
    """The user's module as the loop sees it. It shares the module's parameter, buffer and
    submodule dictionaries (names, engines' replacements and state dicts are the user's own) and
    calls its forward; logits are the output, its .logits, or its first element."""

    def __init__(self, inner: nn.Module, specs: dict[str, RoleSpec], readout: str | None,
                 branch_outputs: tuple[str, ...] = (), buffers=None):
        super().__init__()
        object.__setattr__(self, "inner", inner)      # not a submodule: its dictionaries are ours
        self._parameters = inner._parameters
        self._buffers = inner._buffers
        self._modules = inner._modules
        self._non_persistent_buffers_set = inner._non_persistent_buffers_set
        object.__setattr__(self, "specs", specs)
        object.__setattr__(self, "readout_name", readout)
        object.__setattr__(self, "branch_output_names", tuple(branch_outputs))
        # {name: value}, or a callable giving it on first reset_buffers (build's: the family built
        # once more, which must not run inside deepspeed.zero.Init, where the model is constructed)
        object.__setattr__(self, "_buffer_values", buffers if callable(buffers) else dict(buffers or {}))
        object.__setattr__(self, "_mult_hooks", [])
        object.__setattr__(self, "tap", nn.Identity())  # its output is the readout's input (a feature point)
        if readout is not None:
            self.readout.register_forward_pre_hook(lambda _m, args: (self.tap(args[0]), *args[1:]))
        mu_readout = _mup_readout_type()
        for name, mod in inner.named_modules():
            s = specs.get(f"{name}.weight")
            if mu_readout is not None and isinstance(mod, mu_readout) and s is not None and s.how == "mup":
                # MuReadout reads weight.infshape each forward; the parameter is replaced when
                # materialized (to_empty) or sharded, so its width multiplier is kept on the module
                mod.width_mult = (lambda w=s.m: w)

    # the loop's interface ---------------------------------------------------
    @property
    def readout(self) -> nn.Module:
        # through the child dictionaries: a user's module named "readout" (fastwidth's GPT) would
        # send get_submodule back to this property
        mod = self.inner
        for part in self.readout_name.split("."):
            mod = mod._modules[part]
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if hasattr(out, "logits"):
            return out.logits
        return out[0] if isinstance(out, (tuple, list)) else out

    def features(self, x):  # pragma: no cover - the user's forward is one piece
        raise NotImplementedError("a user's model gives logits only; its features are the readout's input (feature_points)")

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over every target in fp32, plus z_loss × mean(logsumexp²)."""
        logits = self(x)
        z = logits.reshape(-1, logits.shape[-1]).float()
        loss = F.cross_entropy(z, y.reshape(-1))
        if self.z_loss:
            loss = loss + self.z_loss * torch.logsumexp(z, dim=-1).pow(2).mean()
        return loss

    def param_roles(self) -> dict[str, RoleSpec]:
        return self.specs

    def train(self, mode: bool = True):
        super().train(mode)
        self.inner.training = mode
        return self

    def feature_points(self) -> dict[str, nn.Module]:
        own = getattr(self.inner, "feature_points", None)
        if callable(own):
            return own()
        pts = {f"block{i}": b for i, b in enumerate(_blocks(self))}
        if self.readout_name is not None:
            pts["readout_in"] = self.tap
        return pts

    def preact_points(self) -> dict[str, nn.Module]:
        """The user's own preact_points() if it has one; else every linear layer whose matrix is
        an input or hidden one and that widens (fan_out ≥ fan_in: a first layer, an MLP's up
        projection), its output being what a nonlinearity reads."""
        own = getattr(self.inner, "preact_points", None)
        if callable(own):
            return own()
        pts = {}
        for name, mod in self.named_modules():
            s = self.specs.get(f"{name}.weight")
            shape = _shape(mod.weight) if s is not None else ()
            if (isinstance(mod, LINEAR_TYPES) and s is not None and s.role in (Role.INPUT, Role.HIDDEN)
                    and shape[0] >= math.prod(shape[1:])):
                pts[name] = mod
        return pts

    def branch_prefixes(self) -> tuple[str, ...]:
        own = getattr(self.inner, "branch_prefixes", None)
        return tuple(own()) if callable(own) else ()

    def shard_units(self) -> list[nn.Module]:
        return _blocks(self)

    def reset_buffers(self) -> None:
        own = getattr(self.inner, "reset_buffers", None)
        if callable(own):
            own()
            return
        if callable(self._buffer_values):
            object.__setattr__(self, "_buffer_values", self._buffer_values())
        with torch.no_grad():
            for name, buf in self.named_buffers():
                if name in self._buffer_values:
                    buf.copy_(self._buffer_values[name].to(buf.device, buf.dtype))

    def apply_mults(self, forward_mults: dict[str, float], branch_mult: float) -> None:
        """Hooks that apply the table: each module's forward multiplier on its input (linear
        layers only), the branch multiplier on each branch output's output. Idempotent."""
        for h in self._mult_hooks:
            h.remove()
        self._mult_hooks.clear()
        for name, mult in forward_mults.items():
            mod = self.get_submodule(name)
            spec = self.specs.get(f"{name}.weight")
            if spec is not None and spec.forward is not None:
                continue              # the module applies its own (mup.MuReadout)
            if _own_mult(mod):
                mod.mult = float(mult)   # a fastwidth.nn layer carries its multiplier: not hooked as well
                continue
            if mult == 1.0:
                continue
            if not isinstance(mod, LINEAR_TYPES):
                raise ConfigError(f"{name} ({type(mod).__name__}) needs a forward multiplier {mult:g} under this "
                                  f"param.kind, which fastwidth applies only to nn.Linear / nn.ConvNd layers")
            self._mult_hooks.append(mod.register_forward_pre_hook(
                lambda _m, args, k=float(mult): (args[0] * k, *args[1:])))
        if branch_mult != 1.0:
            for name in self.branch_output_names:
                self._mult_hooks.append(self.get_submodule(name).register_forward_hook(
                    lambda _m, _a, out, k=float(branch_mult): out * k))


def _own_mult(mod: nn.Module) -> bool:
    from fastwidth.nn.layers import MuConv2d, MuEmbedding, MuLinear
    return isinstance(mod, (MuLinear, MuConv2d, MuEmbedding))


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The entries, holding parameters, of the ModuleList with the most parameters anywhere in the
    model (a transformer's layers, an MLP's hidden layers): each a shard unit and a feature point."""
    best, best_n = [], 0
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList):
            units = [m for m in mod if any(True for _ in m.parameters())]
            n = sum(p.numel() for u in units for p in u.parameters())
            if n > best_n:
                best, best_n = units, n
    return best


# --------------------------------------------------------------------------- building

def _meta(make, width: int, depth: int) -> nn.Module:
    with torch.device("meta"):
        return call_factory(make, width, depth)


def buffer_values(make, width: int, depth: int) -> dict[str, torch.Tensor]:
    """The family's buffers at `width` as its constructor computes them (RoPE tables): the module
    built once with its parameters put on meta as they are registered (no parameter memory), on
    the CPU whatever the default device (build runs under torch.device("meta"))."""
    register = nn.Module.register_parameter

    def on_meta(mod, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(mod, name, param)
    nn.Module.register_parameter = on_meta
    try:
        with torch.device("cpu"):  # build() runs under build_meta's meta default: buffers must be real
            model = call_factory(make, width, depth)
    finally:
        nn.Module.register_parameter = register
    return {n: b.detach().clone() for n, b in model.named_buffers() if b.device.type != "meta"}


def build(cfg: Config, io, make=None) -> UserModel:
    """The user's family at cfg.model.width (on the current default device, usually meta), wrapped,
    with its roles inferred against param.base_width and twice it."""
    make = make if make is not None else resolve_factory(cfg.model.factory)
    width, depth, base = cfg.model.width, cfg.model.depth, cfg.param.base_width
    inner = call_factory(make, width, depth)
    if mup_prepared(inner):  # its infshapes say what grows (set_base_shapes against the user's own base)
        specs = _roles_from_infshapes(inner, dict(cfg.param.roles))
    else:
        specs = infer_roles(inner, _meta(make, base, depth), _meta(make, 2 * base, depth), dict(cfg.param.roles))
    has_buffers = any(True for _ in inner.buffers())
    buffers = (lambda: buffer_values(make, width, depth)) if has_buffers else {}
    branch = getattr(inner, "branch_outputs", None)
    branch = tuple(branch()) if callable(branch) else ()
    if cfg.param.kind in DEPTH_KINDS and not (branch and callable(getattr(inner, "branch_prefixes", None))):
        raise ConfigError(f"param.kind={cfg.param.kind} scales residual branches: the model needs branch_prefixes() "
                          f"(names of the parameters on branches) and branch_outputs() (the modules ending them)")
    return UserModel(inner, specs, readout_module(inner, specs), branch, buffers)

