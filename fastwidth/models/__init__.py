"""Model construction: build on the meta device, materialize, then initialize from the µP table.

    model, table = build_model(cfg, io, device="cpu", seed=0)

`io` describes the data (a stream works): kind "tokens" with vocab_size and seq_len, or kind
"classes" with in_shape and num_classes. Building on meta first means a sharding engine can wrap
the model before any memory is allocated (torchtitan's order: meta, shard, to_empty, init).
"""
from __future__ import annotations

import torch
from torch import nn

from fastwidth.config import Config
from fastwidth.errors import ConfigError
from fastwidth.models import gpt, hf_families, mlp, resnet, user
from fastwidth.param.scaling import ParamInfo, apply_forward_mults, init_depth, init_parameters, mup_table

BUILDERS = {"gpt": gpt.build, "mlp": mlp.build, "resnet": resnet.build, "python": user.build, "hf": hf_families.build}
KIND_OF_ARCH = {"gpt": "tokens", "mlp": "classes", "resnet": "classes", "python": None, "hf": "tokens"}  # None: either


def build_meta(cfg: Config, io) -> nn.Module:
    """The model on the meta device (no memory), for sharding or planning."""
    with torch.device("meta"):
        return build_uninitialized(cfg, io)


def build_uninitialized(cfg: Config, io) -> nn.Module:
    """The model on the current default device with uninitialized (torch.empty) parameters: for
    constructors that partition each layer as it is made (deepspeed.zero.Init)."""
    arch = cfg.model.arch
    if KIND_OF_ARCH[arch] not in (None, io.kind):
        raise ConfigError(f"model.arch {arch} needs a {KIND_OF_ARCH[arch]} data source, "
                          f"data.source gives {io.kind}")
    model = BUILDERS[arch](cfg, io)
    model.z_loss = cfg.train.z_loss  # the training loss's z-loss (WidthModel.loss)
    return model


def materialize(model: nn.Module, table: dict[str, ParamInfo], device, seed: int, width: int,
                depth: int | None = None) -> nn.Module:
    """Allocate on `device`, then draw parameters from the table (seeded by seed, width and
    name) and reset buffers."""
    model.to_empty(device=device)
    init_parameters(model, table, seed, width, depth)
    model.reset_buffers()
    apply_forward_mults(model, table)
    return model


def build_model(cfg: Config, io, device="cpu", seed: int | None = None) -> tuple[nn.Module, dict[str, ParamInfo]]:
    model = build_meta(cfg, io)
    table = mup_table(model, cfg)
    materialize(model, table, torch.device(device), cfg.train.seed if seed is None else seed, cfg.model.width,
                init_depth(cfg))
    return model, table
