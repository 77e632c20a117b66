"""train.compile: the training step under torch.compile (inductor, which builds C++ on the CPU),
with both kernel backends, follows eager."""

from types import SimpleNamespace

import pytest
import torch

from fastwidth.config import Config
from fastwidth.errors import UserError
from fastwidth.kernels import dispatch
from fastwidth.models import build_model
from fastwidth.trainer.loop import compiled_loss


def _losses(backend: str, compile_: bool, steps: int = 3) -> list[float]:
    cfg = Config()
    cfg.model.arch, cfg.model.width, cfg.model.depth, cfg.model.head_dim = "gpt", 32, 1, 16
    cfg.model.mlp_ratio = 2
    cfg.param.zero_readout = False
    cfg.train.compile = compile_
    io = SimpleNamespace(kind="tokens", vocab_size=37, seq_len=16)
    dispatch.set_backend(backend)
    try:
        model, _ = build_model(cfg, io, device="cpu", seed=0)
        loss_fn = compiled_loss(model, cfg)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        out = []
        for _ in range(steps):
            x = torch.randint(0, 37, (2, 17), generator=g)
            loss = loss_fn(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        return out
    finally:
        dispatch.set_backend("auto")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_training_step_follows_eager(backend):
    torch._dynamo.reset()
    eager = _losses(backend, False)
    compiled = _losses(backend, True)
    assert len(set(eager)) == len(eager), "the steps must change the model"
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-4)


def test_compile_with_a_distributed_engine_is_a_user_error():
    cfg = Config()
    cfg.train.compile = True
    with pytest.raises(UserError, match="train.compile"):
        compiled_loss(torch.nn.Linear(2, 2), cfg, distributed=True)
    cfg.train.compile = False
    m = torch.nn.Linear(2, 2)
    m.loss = lambda x, y: x + y
    assert compiled_loss(m, cfg)(1, 2) == 3
