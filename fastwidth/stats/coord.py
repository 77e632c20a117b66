"""Coordinate checks: how each layer's activations move over the first steps, across widths.

mup's check (Yang et al., Tensor Programs V, §D.1): per layer, the RMS of its output h at init and
of its change h_t - h_0 on a fixed batch x, after each of the first optimizer steps. Under µP
every layer's change stays O(1) in width; under SP hidden and output layers' changes grow.

The refined check (Haas et al., NeurIPS 2025, "On the Surprising Effectiveness of Large Learning
Rates under Standard Width Scaling") splits the change of a layer h = f_W(x) (affine in W, as
every µP layer is: h = mult · x Wᵀ + b, a convolution, an embedding) exactly into
    h_t - h_0 = f_{W_t - W_0}(x_t)  +  (f_{W_0}(x_t) - f_{W_0}(x_0))
              = (W_t - W_0) x_t     +  W_0 (x_t - x_0)
the part due to the layer's own weight updates and the part due to the change of its input
(bias changes belong to the first; an embedding's input never changes). Both are reported as
RMS over the batch and the layer's output coordinates.

    result = coord_check(cfg, [64, 128, 256], steps=3)     # trains fresh models, returns numbers
    tracker = CoordTracker(model, x); tracker.measure()    # the same numbers in the training loop
    result = coord_check_depth(cfg, [2, 4, 8, 16], steps=4)  # across depth at the config's width

Across depth (DESIGN §5; CompleteP, Dey et al. 2025, Fig. 1): at one width, per layer every depth
has (the embedding, `blocks.last` = the residual stream at the last block's output, the final norm,
the readout), the RMS of its output at init and of its change h_T - h_0 on batch 0. Under a depth
parameterization (branch outputs × m_L^-α) the residual stream's change stays O(1) in depth; under
mup it grows with depth.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from fastwidth.config import Config, for_width, resolve
from fastwidth.errors import UserError
from fastwidth.models import build_meta, build_model
from fastwidth.nn.layers import TiedReadout
from fastwidth.param.optim import build_optimizer, set_lr

LAYER_TYPES = ("MuLinear", "MuReadout", "TiedReadout", "MuEmbedding", "MuConv2d")
QUANTITIES = ("act_rms", "delta_rms", "own_rms", "input_rms")
DEPTH_QUANTITIES = ("act_rms", "delta_rms")
LAST_BLOCK = "blocks.last"


def coord_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: mod for name, mod in model.named_modules() if type(mod).__name__ in LAYER_TYPES}


def depth_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers present at every depth, in forward order: the model's top-level modules with
    parameters, its stack of residual blocks (named by branch_prefixes) replaced by the last block
    as "blocks.last". A model without residual blocks has no depth to check: one-line UserError."""
    prefixes = model.branch_prefixes() if hasattr(model, "branch_prefixes") else ()
    if not prefixes:
        raise UserError(f"coord-check --depths: a {type(model).__name__} has no residual blocks to scale with "
                        "depth; use model.arch=gpt")
    stack = model.get_submodule(prefixes[0].rstrip("."))
    return {LAST_BLOCK if mod is stack else name: stack[-1] if mod is stack else mod
            for name, mod in model.named_children() if _weights(mod) or any(True for _ in mod.parameters())}


def _weights(mod: nn.Module) -> dict[str, torch.Tensor]:
    """A layer's own weights by name; a tied readout's is the embedding's matrix it reads."""
    if isinstance(mod, TiedReadout):
        return {"weight": mod.weight}
    return dict(mod.named_parameters(recurse=False))


def _apply(mod: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The layer's output on x with `weights` in place of its own (a tied readout: mult · x Wᵀ)."""
    if isinstance(mod, TiedReadout):
        return mod.mult * (x @ weights["weight"].t())
    return functional_call(mod, weights, (x,))


@torch.no_grad()
def capture(model: nn.Module, x: torch.Tensor,
            layers: dict[str, nn.Module] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (its input, its output)} for one forward of `model` on x (eval mode); `layers`:
    the modules to hook (default: coord_layers(model))."""
    out, handles = {}, []
    for name, mod in (coord_layers(model) if layers is None else layers).items():
        handles.append(mod.register_forward_hook(
            lambda _m, i, o, n=name: out.__setitem__(n, (i[0].detach(), o.detach().float()))))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return out


def _rms(t: torch.Tensor) -> float:
    return float(t.float().pow(2).mean().sqrt())


class CoordTracker:
    """Keeps W_0 and the layers' inputs and outputs on a fixed batch x at init; `measure` splits
    every layer's activation change since then into its own-update and input-change parts."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model, self.x = model, x
        self.w0 = {n: {k: p.detach().clone() for k, p in _weights(mod).items()}
                   for n, mod in coord_layers(model).items()}
        self.cap0 = capture(model, x)

    @torch.no_grad()
    def measure(self, model: nn.Module | None = None) -> dict[str, dict[str, float]]:
        """{layer: {act_rms, delta_rms, own_rms, input_rms}} now (act_rms: RMS of h_t); `model`:
        the same member now, when it is not the object given at init (a fresh whole replica of a
        sharded member)."""
        self.model = model if model is not None else self.model
        cap = capture(self.model, self.x)
        out = {}
        for n, mod in coord_layers(self.model).items():
            (x0, h0), (xt, ht) = self.cap0[n], cap[n]
            delta = {k: p.detach() - self.w0[n][k] for k, p in _weights(mod).items()}
            own = _apply(mod, delta, xt).float()
            moved = _apply(mod, self.w0[n], xt).float() - _apply(mod, self.w0[n], x0).float()
            out[n] = {"act_rms": _rms(ht), "delta_rms": _rms(ht - h0), "own_rms": _rms(own), "input_rms": _rms(moved)}
        return out


class OutputTracker:
    """The outputs of `layers` on a fixed batch x at init; `measure` gives each one's RMS now and
    the RMS of its change since init (no own/input split: a block's forward is not one affine map)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module]):
        self.model, self.x, self.layers = model, x, layers
        self.cap0 = capture(model, x, layers)

    def measure(self) -> dict[str, dict[str, float]]:
        cap = capture(self.model, self.x, self.layers)
        return {n: {"act_rms": _rms(h), "delta_rms": _rms(h - self.cap0[n][1])} for n, (_, h) in cap.items()}


def _train_one(mcfg: Config, io, stream, seed: int, steps: int, tracker=CoordTracker) -> tuple[dict, list[dict]]:
    """Build the member `mcfg` describes, train it `steps` steps on the stream; (RMS of each layer's
    output at init, [tracker.measure() after each step]) on batch 0. `tracker(model, x)`."""
    model, table = build_model(mcfg, io, seed=seed)
    opt = build_optimizer(model, table, mcfg)
    track = tracker(model, stream.batch(0)["x"])
    init = {n: _rms(h) for n, (_, h) in track.cap0.items()}
    by_step = []
    for t in range(steps):
        b = stream.batch(t)
        set_lr(opt, mcfg.optim, t, mcfg.train.steps)
        model.loss(b["x"], b["y"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        by_step.append(track.measure())
    return init, by_step


def _layers(per_size: list[list[tuple[dict, list[dict]]]], steps: int, quantities: tuple[str, ...]) -> dict:
    """{layer: {act_rms, update_rms, update_rms_by_step, by_step}} listed per size (width or depth),
    each the mean over the seeds' runs `per_size[i]`; a layer some size lacks is left out."""
    n, layers = len(per_size), {}
    for i, runs in enumerate(per_size):
        for name in runs[0][0]:
            layer = layers.setdefault(name, {"act_rms": [None] * n, "update_rms": [None] * n,
                                             "update_rms_by_step": [None] * n,
                                             "by_step": {q: [None] * n for q in quantities}})
            layer["act_rms"][i] = sum(init[name] for init, _ in runs) / len(runs)
            for q in quantities:
                layer["by_step"][q][i] = [sum(by[t][name][q] for _, by in runs) / len(runs) for t in range(steps)]
            layer["update_rms_by_step"][i] = layer["by_step"]["delta_rms"][i]
            layer["update_rms"][i] = layer["update_rms_by_step"][i][-1]
    return {name: layer for name, layer in layers.items() if None not in layer["act_rms"]}


def _stream_io(cfg: Config, stream):
    from fastwidth.data import build_stream, data_io
    stream = stream or build_stream(cfg.data)
    return stream, data_io(stream, cfg)


def coord_check(cfg: Config, widths: list[int], steps: int = 3, seeds: tuple[int, ...] = (0,),
                stream=None) -> dict:
    """Train each width `steps` steps on the config's stream; measure every layer on batch 0.

    Inputs: cfg (a config; model.width is replaced by each width), widths, steps, seeds (the
    result is averaged over them), stream (a built data stream; built from cfg.data if None).
    Outputs: {"widths", "steps", "kind", "optim", "layers": {layer: {"act_rms": [per width, at init],
    "update_rms": [per width, RMS of h_T - h_0], "update_rms_by_step": [[per step] per width],
    "by_step": {q: [[per step] per width] for q in act_rms, delta_rms, own_rms, input_rms}}}}.
    """
    cfg = resolve(cfg)
    stream, io = _stream_io(cfg, stream)
    per_width = [[_train_one(for_width(cfg, w), io, stream, s, steps) for s in seeds] for w in widths]
    return {"widths": list(widths), "steps": steps, "kind": cfg.param.kind, "optim": cfg.optim.name,
            "arch": cfg.model.arch, "layers": _layers(per_width, steps, QUANTITIES)}


def coord_check_depth(cfg: Config, depths: list[int], steps: int = 3, seeds: tuple[int, ...] = (0,),
                      stream=None) -> dict:
    """Train each depth `steps` steps at the config's width on its stream; measure on batch 0 the
    layers every depth has (depth_layers: embedding, blocks.last, final norm, readout).

    Inputs: cfg (model.depth is replaced by each depth; param.base_depth as configured), depths,
    steps, seeds (averaged over), stream (built from cfg.data if None).
    Outputs: {"depths", "width", "base_depth", "steps", "kind", "optim", "arch", "layers": {layer:
    {"act_rms": [per depth, at init], "update_rms": [per depth, RMS of h_T - h_0],
    "update_rms_by_step": [[per step] per depth], "by_step": {act_rms, delta_rms: [[per step] per depth]}}}}.
    """
    import dataclasses
    cfg = resolve(cfg)
    stream, io = _stream_io(cfg, stream)
    at = [dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, depth=d)) for d in depths]
    depth_layers(build_meta(at[0], io))   # refuses a model without blocks, before any work

    def tracker(model, x):
        return OutputTracker(model, x, depth_layers(model))
    per_depth = [[_train_one(c, io, stream, s, steps, tracker) for s in seeds] for c in at]
    return {"depths": list(depths), "width": cfg.model.width, "base_depth": cfg.param.base_depth, "steps": steps,
            "kind": cfg.param.kind, "optim": cfg.optim.name, "arch": cfg.model.arch,
            "layers": _layers(per_depth, steps, DEPTH_QUANTITIES)}


def spread(values: list[float]) -> float:
    """max / min of positive values (how much a per-width quantity varies across widths)."""
    return max(values) / max(min(values), 1e-30)
