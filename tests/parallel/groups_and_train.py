"""Launched like launch/train.py (torchrun / deepspeed): after wrapping, every rank dumps its live
optimizer groups (names, lr_mult, wd_mult, lr, eps, global shapes, local element counts) to
OUT/groups.rank<r>.json and its node and device mesh (FSDP2: the ranks of each mesh dimension's
group) to OUT/layout.rank<r>.json, then trains."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastwidth.cli import build_parser, overrides_of  # noqa: E402
from fastwidth.config import load_config  # noqa: E402
from fastwidth.parallel.nodes import node_key  # noqa: E402
from fastwidth.trainer.loop import Trainer  # noqa: E402


def local_numel(p):
    if hasattr(p, "ds_tensor"):          # ZeRO-3: this rank's flat partition (padded to equal sizes)
        return p.ds_tensor.numel()
    if hasattr(p, "to_local"):           # FSDP2 DTensor: this rank's dim-0 shard
        return p.to_local().numel()
    return p.numel()


def global_shape(p):
    if hasattr(p, "ds_shape"):           # ZeRO-3 partitions: p.shape is the local (flat) piece
        return list(p.ds_shape)
    return list(p.shape)                 # DTensor .shape is the global shape


def main():
    args = build_parser().parse_args(["train", *sys.argv[1:]])
    cfg = load_config(args.config, overrides_of(args))
    trainer = Trainer(cfg)
    rows = {}
    for m in trainer.members:
        named = dict(m.model.named_parameters())
        rows[m.name] = [{"names": g["names"], "lr_mult": g["lr_mult"], "wd_mult": g["wd_mult"], "lr": g["lr"],
                         "eps": g.get("eps"), "weight_decay": g["weight_decay"],
                         "shapes": [global_shape(named[n]) for n in g["names"]],
                         "local": [local_numel(named[n]) for n in g["names"]]}
                        for g in m.optimizer.param_groups]
    out = Path(cfg.train.out_dir)
    (out / f"groups.rank{trainer.dist.rank}.json").write_text(json.dumps(rows))
    layout = {"node": node_key()}
    mesh = getattr(trainer.placement.main, "mesh", None)
    if mesh is not None:
        import torch.distributed as dist
        layout["mesh"] = mesh.mesh.tolist()
        layout.update({d: dist.get_process_group_ranks(mesh.get_group(d)) for d in mesh.mesh_dim_names})
    (out / f"layout.rank{trainer.dist.rank}.json").write_text(json.dumps(layout))
    try:
        with trainer.dist.guard("training"):
            trainer.run()
    finally:
        trainer.dist.close()


if __name__ == "__main__":
    main()
