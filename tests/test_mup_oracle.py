"""microsoft/mup as the oracle: the same MLP built by mup (MuReadout, set_base_shapes, MuAdam or
MuSGD) from fastwidth's initial weights trains to the same losses as fastwidth's µP."""
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from fastwidth.config import load_config
from fastwidth.models import build_model
from fastwidth.param.optim import build_optimizer

mup = pytest.importorskip("mup")

IN, CLASSES, DEPTH, BASE, WIDTH, STEPS = 12, 5, 3, 8, 32, 50


class MupMLP(nn.Module):
    """fastwidth's MLP written the way mup's README writes models: nn.Linear layers, mup.MuReadout."""

    def __init__(self, width: int, output_mult: float):
        super().__init__()
        dims = [IN] + [width] * DEPTH
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(DEPTH))
        self.readout = mup.MuReadout(width, CLASSES, output_mult=output_mult)

    def forward(self, x):
        for lin in self.layers:
            x = torch.relu(lin(x))
        return self.readout(x)


def _cfg(opt: str, lr: float):
    return load_config(None, ["model.arch=mlp", f"model.depth={DEPTH}", f"model.width={WIDTH}", "model.act=relu",
                              "param.kind=mup", f"param.base_width={BASE}", "param.zero_readout=false",
                              "param.output_mult=2.0", f"optim.name={opt}", f"optim.lr={lr}", "optim.grad_clip=0",
                              "optim.momentum=0.9" if opt == "sgd" else "optim.momentum=0"])


def _mup_twin(fw_model: nn.Module, cfg):
    model = MupMLP(WIDTH, cfg.param.output_mult)
    mup.set_base_shapes(model, MupMLP(BASE, 1.0), delta=MupMLP(BASE * 2, 1.0))
    with torch.no_grad():                                             # after set_base_shapes: its rescale is overwritten
        for (name, p), (fw_name, q) in zip(model.named_parameters(), fw_model.named_parameters()):
            assert name == fw_name and p.shape == q.shape
            p.copy_(q)
    return model.double()


def _losses(model, opt, data) -> list[float]:
    out = []
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out


def _data():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(IN, CLASSES, generator=g, dtype=torch.float64)
    xs = torch.randn(STEPS, 32, IN, generator=g, dtype=torch.float64)
    return [(x, (x @ teacher).argmax(-1)) for x in xs]


@pytest.mark.parametrize("opt, lr", [("adam", 1e-3), ("sgd", 1e-2)])
def test_mup_reproduces_fastwidth_losses(opt, lr):
    cfg = _cfg(opt, lr)
    io = type("IO", (), {"kind": "classes", "in_shape": (IN,), "num_classes": CLASSES})()
    fw, table = build_model(cfg, io, seed=3)
    fw.double()
    twin = _mup_twin(fw, cfg)
    fw_opt = build_optimizer(fw, table, cfg)
    kw = dict(lr=lr, momentum=0.9) if opt == "sgd" else dict(lr=lr, betas=(0.9, 0.999), eps=1e-8)
    mu_opt = (mup.MuSGD if opt == "sgd" else mup.MuAdam)(twin.parameters(), **kw)
    data = _data()
    with torch.no_grad():
        assert torch.allclose(fw(data[0][0]), twin(data[0][0]), atol=1e-12)   # MuReadout's α/m = the table's
    a, b = _losses(fw, fw_opt, data), _losses(twin, mu_opt, data)
    assert a[-1] < a[0] - 1e-3                                        # it trains
    assert max(abs(u - v) for u, v in zip(a, b)) <= 1e-6
    # the check can fail: the same twin under the optimizer without mup's scaling drifts away
    plain = _mup_twin(build_model(cfg, io, seed=3)[0].double(), cfg)
    c = _losses(plain, (torch.optim.SGD if opt == "sgd" else torch.optim.Adam)(plain.parameters(), **kw), data)
    assert max(abs(u - v) for u, v in zip(a, c)) > 1e-4
