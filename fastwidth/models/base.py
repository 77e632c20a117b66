"""What every fastwidth model offers the loop and the statistics (single-device code)."""
from __future__ import annotations

import torch
from torch import nn

from fastwidth.kernels.readout_ce import readout_cross_entropy


class WidthModel(nn.Module):
    """features(x) -> h; readout(h) -> logits; loss(x, y) through the fused readout+CE op."""

    readout: nn.Module
    z_loss: float = 0.0  # train.z_loss, set when built (fastwidth.models.build_uninitialized)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.features(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over every target (tokens for the GPT, examples otherwise), plus
        z_loss × the mean of logsumexp(logits)² (PaLM's z-loss; 0 by default) in the same fused op."""
        h = self.features(x)
        h2 = h.reshape(-1, h.shape[-1])  # (rows, N)
        r = self.readout
        return readout_cross_entropy(h2, r.weight, y.reshape(-1), multiplier=r.mult, bias=r.bias,
                                     z_loss=self.z_loss)

    def feature_points(self) -> dict[str, nn.Module]:
        """Modules whose outputs are representations (feature kernels, CKA)."""
        return {}

    def preact_points(self) -> dict[str, nn.Module]:
        """Modules whose outputs are preactivations (moments, histograms)."""
        return {}

    def branch_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the parameters on residual branches (their outputs are
        scaled by the depth kinds' branch multiplier, fastwidth.param.scaling.branch_mult)."""
        return ()

    def reset_buffers(self) -> None:
        """Recompute non-parameter buffers after `to_empty` (RoPE tables, norm statistics)."""
