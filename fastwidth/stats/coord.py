"""Coordinate check (Yang et al., Tensor Programs V, §D.1): per-layer activation RMS and the RMS
of its change over the first optimizer steps, across widths.

Under µP every layer's update RMS stays O(1) in width; under SP the hidden and output layers'
updates grow with width. `coord_check` returns the numbers; `plot_coord_check` draws them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from fastwidth.config import Config, for_width, load_config, resolve
from fastwidth.models import build_model
from fastwidth.param.optim import build_optimizer, set_lr

LAYER_TYPES = ("MuLinear", "MuReadout", "MuEmbedding", "MuConv2d")


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: mod for name, mod in model.named_modules() if type(mod).__name__ in LAYER_TYPES}


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out, handles = {}, []
    for name, mod in _layers(model).items():
        handles.append(mod.register_forward_hook(lambda _m, _i, o, n=name: out.__setitem__(n, o.detach().float())))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def _rms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


def coord_check(cfg: Config, widths: list[int], steps: int = 3, seeds: tuple[int, ...] = (0,),
                stream=None) -> dict:
    """Train each width `steps` steps on the config's stream; measure every layer on batch 0.

    Inputs: cfg (a config; model.width is replaced by each width), widths, steps, seeds (the
    result is averaged over them), stream (a built data stream; built from cfg.data if None).
    Outputs: {"widths": [...], "layers": {layer: {"act_rms": [per width], "update_rms":
    [per width, after the last step], "update_rms_by_step": [[per step] per width]}}}.
    """
    from fastwidth.data import build_stream
    from fastwidth.train.loop import data_io

    cfg = resolve(cfg)
    stream = stream or build_stream(cfg.data)
    io = data_io(stream, cfg)
    x0 = stream.batch(0)["x"]
    result: dict = {"widths": list(widths), "steps": steps, "kind": cfg.param.kind, "layers": {}}
    for wi, w in enumerate(widths):
        wcfg = for_width(cfg, w)
        acc: dict[str, list] = {}
        for seed in seeds:
            model, table = build_model(wcfg, io, seed=seed)
            opt = build_optimizer(model, table, wcfg)
            h0 = _outputs(model, x0)
            by_step = {n: [] for n in h0}
            for t in range(steps):
                b = stream.batch(t)
                set_lr(opt, wcfg.optim, t, wcfg.train.steps)
                model.loss(b["x"], b["y"]).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                ht = _outputs(model, x0)
                for n in h0:
                    by_step[n].append(_rms(ht[n] - h0[n]))
            for n in h0:
                a = acc.setdefault(n, [0.0, [0.0] * steps])
                a[0] += _rms(h0[n]) / len(seeds)
                a[1] = [s + v / len(seeds) for s, v in zip(a[1], by_step[n])]
        for n, (act, ups) in acc.items():
            layer = result["layers"].setdefault(n, {"act_rms": [None] * len(widths), "update_rms": [None] * len(widths),
                                                    "update_rms_by_step": [None] * len(widths)})
            layer["act_rms"][wi], layer["update_rms"][wi], layer["update_rms_by_step"][wi] = act, ups[-1], ups
    return result


def spread(values: list[float]) -> float:
    """max / min of positive values (how much a per-width quantity varies across widths)."""
    return max(values) / max(min(values), 1e-30)


def plot_coord_check(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, layer in result["layers"].items():
        axes[0].plot(result["widths"], layer["act_rms"], marker="o", label=name)
        axes[1].plot(result["widths"], layer["update_rms"], marker="o", label=name)
    for ax, title in zip(axes, ("activation RMS at init", f"RMS of activation change after {result['steps']} steps")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"coordinate check ({result['kind']}): flat lines mean width-stable")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_coord_check(args) -> int:
    from fastwidth.cli import overrides_of
    cfg = load_config(args.config, overrides_of(args))
    widths = args.widths or resolve(cfg).sweep.widths
    result = coord_check(cfg, widths, steps=args.steps, seeds=tuple(range(args.seeds)))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coord_check.json").write_text(json.dumps(result, indent=1))
    plot_coord_check(result, out / "coord_check.png")
    for name, layer in result["layers"].items():
        print(f"{name:32s} update RMS max/min across widths: {spread(layer['update_rms']):.2f}")
    print(f"wrote {out / 'coord_check.json'} and {out / 'coord_check.png'}")
    return 0


def add_parser(sub) -> None:
    from fastwidth.cli import add_config_args, width_list
    p = sub.add_parser("coord-check", help="per-layer activation and update RMS across widths")
    add_config_args(p, required=False)
    p.add_argument("--widths", type=width_list, default=[], help="comma-separated widths (default: sweep.widths)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps")
    p.add_argument("--seeds", type=int, default=2, help="seeds averaged")
    p.add_argument("-o", "--output", default="coord_check", help="output directory")
    p.set_defaults(func=cmd_coord_check)
