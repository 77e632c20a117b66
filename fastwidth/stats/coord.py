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
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from fastwidth.config import Config, resolve
from fastwidth.models import build_model
from fastwidth.param.optim import build_optimizer, set_lr

LAYER_TYPES = ("MuLinear", "MuReadout", "MuEmbedding", "MuConv2d")
QUANTITIES = ("act_rms", "delta_rms", "own_rms", "input_rms")


def coord_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: mod for name, mod in model.named_modules() if type(mod).__name__ in LAYER_TYPES}


@torch.no_grad()
def capture(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (its input, its output)} for one forward of `model` on x (eval mode)."""
    out, handles = {}, []
    for name, mod in coord_layers(model).items():
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
        self.w0 = {n: {k: p.detach().clone() for k, p in mod.named_parameters(recurse=False)}
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
            delta = {k: p.detach() - self.w0[n][k] for k, p in mod.named_parameters(recurse=False)}
            own = functional_call(mod, delta, (xt,)).float()
            moved = functional_call(mod, self.w0[n], (xt,)).float() - functional_call(mod, self.w0[n], (x0,)).float()
            out[n] = {"act_rms": _rms(ht), "delta_rms": _rms(ht - h0), "own_rms": _rms(own), "input_rms": _rms(moved)}
        return out


def _train_one(cfg: Config, io, stream, width: int, seed: int, steps: int) -> tuple[dict, list[dict]]:
    from fastwidth.config import for_width
    wcfg = for_width(cfg, width)
    model, table = build_model(wcfg, io, seed=seed)
    opt = build_optimizer(model, table, wcfg)
    tracker = CoordTracker(model, stream.batch(0)["x"])
    init = {n: _rms(h) for n, (_, h) in tracker.cap0.items()}
    by_step = []
    for t in range(steps):
        b = stream.batch(t)
        set_lr(opt, wcfg.optim, t, wcfg.train.steps)
        model.loss(b["x"], b["y"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        by_step.append(tracker.measure())
    return init, by_step


def coord_check(cfg: Config, widths: list[int], steps: int = 3, seeds: tuple[int, ...] = (0,),
                stream=None) -> dict:
    """Train each width `steps` steps on the config's stream; measure every layer on batch 0.

    Inputs: cfg (a config; model.width is replaced by each width), widths, steps, seeds (the
    result is averaged over them), stream (a built data stream; built from cfg.data if None).
    Outputs: {"widths", "steps", "kind", "optim", "layers": {layer: {"act_rms": [per width, at init],
    "update_rms": [per width, RMS of h_T - h_0], "update_rms_by_step": [[per step] per width],
    "by_step": {q: [[per step] per width] for q in act_rms, delta_rms, own_rms, input_rms}}}}.
    """
    from fastwidth.data import build_stream, data_io

    cfg = resolve(cfg)
    stream = stream or build_stream(cfg.data)
    io = data_io(stream, cfg)
    result: dict = {"widths": list(widths), "steps": steps, "kind": cfg.param.kind, "optim": cfg.optim.name,
                    "arch": cfg.model.arch, "layers": {}}
    for wi, w in enumerate(widths):
        runs = [_train_one(cfg, io, stream, w, s, steps) for s in seeds]
        for n in runs[0][0]:
            layer = result["layers"].setdefault(n, {"act_rms": [None] * len(widths), "update_rms": [None] * len(widths),
                                                    "update_rms_by_step": [None] * len(widths),
                                                    "by_step": {q: [None] * len(widths) for q in QUANTITIES}})
            layer["act_rms"][wi] = sum(init[n] for init, _ in runs) / len(runs)
            for q in QUANTITIES:
                layer["by_step"][q][wi] = [sum(by[t][n][q] for _, by in runs) / len(runs) for t in range(steps)]
            layer["update_rms_by_step"][wi] = layer["by_step"]["delta_rms"][wi]
            layer["update_rms"][wi] = layer["update_rms_by_step"][wi][-1]
    return result


def spread(values: list[float]) -> float:
    """max / min of positive values (how much a per-width quantity varies across widths)."""
    return max(values) / max(min(values), 1e-30)
