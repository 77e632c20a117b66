"""A member's identity: which model of a sweep it is, and the name its files and rows go by.

    spec = MemberSpec(width=64, lr=None, seed=0)   # spec.name == "w64_s0"
    MemberSpec(64, 0.001, 0).name                  # "w64_lr0.001_s0" (sweep.lrs)
    MemberSpec.parse("w64_lr0.001_s0")             # MemberSpec(width=64, lr=0.001, seed=0)
    MemberSpec(64, None, 0, depth=4).name          # "w64_d4_s0" (sweep.depths)
    member_specs(cfg)                              # every member of the sweep, the reference (width, depth) first

The name is the key of a member's signatures (signatures/<name>/), its checkpoint files and
`fastwidth export --member NAME`: it must not change for runs already on disk.
"""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastwidth.config import Config

_NAME = re.compile(r"w(\d+)(?:_d(\d+))?(?:_lr([^_]+))?_s(-?\d+)")


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    """One member of a sweep. lr: its base learning rate in a learning-rate sweep (sweep.lrs), None
    outside one. depth: its model.depth in a depth sweep (sweep.depths), None outside one (the
    model's configured depth; the name is as it always was)."""
    width: int
    lr: float | None
    seed: int
    depth: int | None = None

    @property
    def name(self) -> str:
        """w64_s0, w64_lr0.001_s0 in a learning-rate sweep (lr to 6 significant digits, `:g`), and
        `_d<depth>` after the width when depth is set. The seed stays last."""
        depth = "" if self.depth is None else f"_d{self.depth}"
        lr = "" if self.lr is None else f"_lr{self.lr:g}"
        return f"w{self.width}{depth}{lr}_s{self.seed}"

    @classmethod
    def parse(cls, name: str) -> "MemberSpec":
        """The spec a member name was made from (its lr as written in the name); ValueError for a
        name no MemberSpec makes."""
        found = _NAME.fullmatch(name)
        if found is None:
            raise ValueError(f"{name!r} is not a member name (w<width>[_d<depth>][_lr<lr>]_s<seed>, e.g. w64_s0)")
        width, depth, lr, seed = found.groups()
        try:
            return cls(int(width), None if lr is None else float(lr), int(seed), None if depth is None else int(depth))
        except ValueError:
            raise ValueError(f"{name!r} is not a member name: {lr!r} is not a learning rate") from None


def member_specs(cfg: Config) -> list[MemberSpec]:
    """Every member of the sweep `cfg` describes, in training order: the reference width first,
    then the others; per width the reference depth first, then the other depths (sweep.depths;
    depth None without); per depth every learning rate of sweep.lrs (None without), per lr every
    seed. So the first member is the reference (width, depth). An unresolved config (the memory
    planner reads those) falls back as config.resolve does: model.width, the widest width and the
    deepest depth as references, train.seed."""
    widths = list(cfg.sweep.widths or [cfg.model.width])
    ref = cfg.sweep.reference_width or max(widths)
    depths = list(cfg.sweep.depths) or [None]
    ref_depth = reference_depth(cfg)
    lrs = [float(lr) for lr in cfg.sweep.lrs] or [None]
    seeds = cfg.sweep.seeds or [cfg.train.seed]
    return [MemberSpec(w, lr, s, d) for w in [ref] + [w for w in widths if w != ref]
            for d in [ref_depth] + [d for d in depths if d != ref_depth] for lr in lrs for s in seeds]


def member_config(cfg: Config, width: int, base_lr: float | None = None, depth: int | None = None) -> Config:
    """The config one member trains with: model.width = width, in a learning-rate sweep optim.lr =
    base_lr, in a depth sweep model.depth = depth (None leaves each as configured)."""
    model = dataclasses.replace(cfg.model, width=width, **({} if depth is None else {"depth": int(depth)}))
    out = dataclasses.replace(cfg, model=model)
    if base_lr is None:
        return out
    return dataclasses.replace(out, optim=dataclasses.replace(cfg.optim, lr=float(base_lr)))


def reference_depth(cfg: Config) -> int | None:
    """The depth the others are compared with at the same width: sweep.reference_depth, 0 meaning
    the deepest of sweep.depths; None outside a depth sweep."""
    if not cfg.sweep.depths:
        return None
    return cfg.sweep.reference_depth or max(cfg.sweep.depths)
