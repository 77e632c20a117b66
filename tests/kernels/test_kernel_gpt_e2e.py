"""End to end: a small µP GPT trained with kernels=triton (interpreted) and kernels=torch gives the
same loss curve: in fp32 to 1e-4 over 30 steps, and under bf16 autocast (the GPU's default path,
train.kernels=auto train.precision=auto on CUDA) within bf16 tolerance over 8 steps."""

import contextlib

from types import SimpleNamespace

import pytest
import torch

from fastwidth.config import Config
from fastwidth.kernels import dispatch
from fastwidth.models import build_model


def _curve(backend: str, cfg, io, steps: int = 30, bf16: bool = False) -> list[float]:
    dispatch.set_backend(backend)
    try:
        model, _ = build_model(cfg, io, device="cpu", seed=0)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            x = torch.randint(0, io.vocab_size, (2, io.seq_len + 1), generator=g)
            x[:, 1::2] = (x[:, 0:-1:2] * 7 + 3) % io.vocab_size  # learnable structure: loss must fall
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with amp:
                loss = model.loss(x[:, :-1], x[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses
    finally:
        dispatch.set_backend("auto")


def _setup(norm, act):
    cfg = Config()
    cfg.model.arch, cfg.model.width, cfg.model.depth, cfg.model.head_dim = "gpt", 64, 1, 32
    cfg.model.norm, cfg.model.act, cfg.model.mlp_ratio = norm, act, 2
    cfg.param.zero_readout = False  # a nonzero readout makes every kernel's gradient matter from step 0
    io = SimpleNamespace(kind="tokens", vocab_size=67, seq_len=19)
    return cfg, io


@pytest.mark.slow
@pytest.mark.parametrize("norm,act", [("rms", "gelu")])  # layer/swiglu: unit tests (interpreter time)
def test_gpt_loss_curve_triton_equals_torch(norm, act):
    cfg, io = _setup(norm, act)
    ref = _curve("torch", cfg, io)
    got = _curve("triton", cfg, io)
    assert ref[-1] < ref[0] - 0.2, "the model did not learn: the comparison would be vacuous"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_gpt_bf16_autocast_triton_follows_torch():
    # layer norm and SwiGLU here, so the fp32 test's rms/gelu and this one cover both of each
    cfg, io = _setup("layer", "swiglu")
    ref = _curve("torch", cfg, io, steps=8, bf16=True)
    got = _curve("triton", cfg, io, steps=8, bf16=True)
    fp32 = _curve("torch", cfg, io, steps=8)
    assert ref[-1] < ref[0] - 0.1, "the model did not learn: the comparison would be vacuous"
    # bf16 tolerance: the two backends round differently (the interpreter truncates bf16 stores),
    # so allow the gap bf16 itself opens against fp32, twice, plus 5e-3
    gap = max(abs(a - b) for a, b in zip(ref, fp32))
    diff = max(abs(a - b) for a, b in zip(got, ref))
    assert diff <= 2 * gap + 5e-3, f"triton vs torch under bf16: {diff:.4f} > 2 x bf16-vs-fp32 {gap:.4f} + 0.005"
