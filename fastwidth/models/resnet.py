"""CIFAR-style ResNet: a 3x3 stem, four stages of BasicBlocks with width x [1, 2, 4, 8] channels
(stride 2 from the second stage on), global average pooling and a µP readout.

Depth: model.depth is the number of BasicBlocks per stage, so m_L = depth / param.base_depth is
also the ratio of the total residual blocks (4 · depth) to the base model's. Under the depth kinds
every block's residual branch (conv1-bn1-relu-conv2-bn2) is × m_L^-α before the add; the shortcut
(identity or the 1x1 projection) and the stem are not scaled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastwidth.models.base import WidthModel
from fastwidth.nn import BatchNorm2d, MuConv2d, MuReadout
from fastwidth.nn.roles import Role
from fastwidth.param.scaling import branch_mult

STAGE_MULTS = (1, 2, 4, 8)


BRANCH_LAYERS = ("conv1", "bn1", "conv2", "bn2")  # a BasicBlock's residual branch (not its shortcut)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, device=None, branch: float = 1.0):
        super().__init__()
        self.branch = branch  # the depth kinds' m_L^-α on the residual branch (1.0: mup and the others)
        self.conv1 = MuConv2d(cin, cout, 3, stride=stride, device=device)
        self.bn1 = BatchNorm2d(cout, device=device)
        self.conv2 = MuConv2d(cout, cout, 3, device=device)
        self.bn2 = BatchNorm2d(cout, device=device)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(MuConv2d(cin, cout, 1, stride=stride, device=device),
                                       BatchNorm2d(cout, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.short is None else self.short(x)
        # shortcut + branch · out in the add's one pass (torch.add's alpha): no extra pass for m_L^-α
        return F.relu(short + out if self.branch == 1.0 else torch.add(short, out, alpha=self.branch))


class ResNet(WidthModel):
    def __init__(self, in_channels: int, width: int, blocks_per_stage: int, num_classes: int, device=None,
                 branch: float = 1.0):
        super().__init__()
        self.stem = MuConv2d(in_channels, width, 3, role=Role.INPUT, device=device)
        self.stem_bn = BatchNorm2d(width, device=device)
        stages, cin = [], width
        for s, mult in enumerate(STAGE_MULTS):
            cout = width * mult
            blocks = [BasicBlock(cin if b == 0 else cout, cout, 2 if (s > 0 and b == 0) else 1, device=device,
                                 branch=branch) for b in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.readout = MuReadout(cin, num_classes, device=device)

    def reset_buffers(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem_bn(self.stem(x)))  # (B, w, H, W)
        for stage in self.stages:
            h = stage(h)
        return h.mean(dim=(2, 3))  # (B, 8w)

    def branch_prefixes(self):
        return tuple(f"stages.{s}.{b}.{layer}." for s, stage in enumerate(self.stages) for b in range(len(stage))
                     for layer in BRANCH_LAYERS)

    def feature_points(self):
        return {f"stage{i}": s for i, s in enumerate(self.stages)}

    def preact_points(self):
        # after BatchNorm (what the ReLU sees): the conv outputs' scale is BatchNorm's to set
        return {"stem": self.stem_bn, **{f"stage{i}.bn1": s[0].bn1 for i, s in enumerate(self.stages)}}


def build(cfg, io, device=None) -> ResNet:
    if len(io.in_shape) != 3:
        raise ValueError(f"resnet needs images (C, H, W), the data gives shape {io.in_shape}")
    return ResNet(io.in_shape[0], cfg.model.width, cfg.model.depth, io.num_classes, device=device,
                  branch=branch_mult(cfg))
