"""End to end: a small µP GPT trained 30 steps with kernels=native gives the loss curve of
kernels=torch in fp32 (every native op on the path: norms with the residual add, RoPE, the fused
readout cross-entropy)."""
from types import SimpleNamespace

import pytest
import torch

from fastwidth.config import Config
from tests.kernels.native_skip import native_or_skip
from tests.kernels.test_kernel_gpt_e2e import _curve

native_or_skip()


@pytest.mark.parametrize("norm,act", [("rms", "gelu"), ("layer", "swiglu")])
def test_gpt_loss_curve_native_equals_torch(norm, act):
    cfg = Config()
    cfg.model.arch, cfg.model.width, cfg.model.depth, cfg.model.head_dim = "gpt", 64, 2, 16
    cfg.model.norm, cfg.model.act, cfg.model.mlp_ratio = norm, act, 2
    cfg.param.zero_readout = False  # a nonzero readout makes every kernel's gradient matter from step 0
    io = SimpleNamespace(kind="tokens", vocab_size=67, seq_len=19)
    ref = _curve("torch", cfg, io)
    got = _curve("native", cfg, io)
    assert ref[-1] < ref[0] - 0.2, "the model did not learn: the comparison would be vacuous"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-4)
