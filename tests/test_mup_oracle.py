"""microsoft/mup as the oracle, for the init, the optimizers and the layers µP touches.

- init: under param.init=torch fastwidth draws what mup gives a model built with PyTorch's
  defaults after set_base_shapes (each parameter's spread and bounds, compared per tensor at two
  widths with tolerances from the sample size; the readout zero or MuReadout's √m-rescaled one).
- training: the same MLP built by mup (MuReadout, set_base_shapes, MuAdam / MuAdamW with weight
  decay / MuSGD) from fastwidth's initial weights trains to the same losses; so does a µP GPT
  block (token embedding, attention, RMSNorm, MLP) against a mup-built twin under MuAdamW.

What mup has no counterpart for, and the twin therefore writes itself: attention (mup's README
asks the user to scale logits by 1/d instead of 1/√d; the twin does, with attn_mult = √(base
head_dim), and uses fastwidth's RoPE reference, which µP does not touch), RMSNorm (a VECTOR gain:
mup treats any one-width-dim tensor alike) and the zero-query option (not tested here).
"""
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from fastwidth.config import load_config
from fastwidth.kernels import dispatch
from fastwidth.kernels.rope import rope_ref
from fastwidth.models import build_model
from fastwidth.nn.attention import rope_tables
from fastwidth.param.optim import build_optimizer

mup = pytest.importorskip("mup")

IN, CLASSES, DEPTH, BASE, WIDTH, STEPS = 12, 5, 3, 8, 32, 50
MLP_IO = type("IO", (), {"kind": "classes", "in_shape": (IN,), "num_classes": CLASSES})()


class MupMLP(nn.Module):
    """fastwidth's MLP written the way mup's README writes models: nn.Linear layers, mup.MuReadout."""

    def __init__(self, width: int, output_mult: float = 1.0, zero_readout: bool = False):
        super().__init__()
        dims = [IN] + [width] * DEPTH
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(DEPTH))
        self.readout = mup.MuReadout(width, CLASSES, output_mult=output_mult, readout_zero_init=zero_readout)

    def forward(self, x):
        for lin in self.layers:
            x = torch.relu(lin(x))
        return self.readout(x)


def _cfg(opt: str, lr: float, *sets):
    return load_config(None, ["model.arch=mlp", f"model.depth={DEPTH}", f"model.width={WIDTH}", "model.act=relu",
                              "param.kind=mup", f"param.base_width={BASE}", "param.zero_readout=false",
                              "param.output_mult=2.0", f"optim.name={opt}", f"optim.lr={lr}", "optim.grad_clip=0",
                              "optim.momentum=0.9" if opt == "sgd" else "optim.momentum=0", *sets])


def _copy_into(model: nn.Module, fw_model: nn.Module) -> nn.Module:
    """fastwidth's weights into the twin (after set_base_shapes: its rescale is overwritten)."""
    fw = dict(fw_model.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            assert p.shape == fw[name].shape, name
            p.copy_(fw[name])
    assert set(fw) == {n for n, _ in model.named_parameters()}
    return model.double()


def _mup_twin(fw_model: nn.Module, cfg):
    model = MupMLP(WIDTH, cfg.param.output_mult)
    mup.set_base_shapes(model, MupMLP(BASE), delta=MupMLP(BASE * 2))
    return _copy_into(model, fw_model)


def _losses(model, opt, data, loss_fn=None) -> list[float]:
    out = []
    for x, y in data:
        loss = loss_fn(model, x, y) if loss_fn else F.cross_entropy(model(x), y)
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


def _gap(a: list[float], b: list[float]) -> float:
    return max(abs(u - v) for u, v in zip(a, b))


def _mu_opt(opt: str, params, lr: float, wd: float):
    if opt == "sgd":
        return mup.MuSGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    cls = mup.MuAdamW if opt == "adamw" else mup.MuAdam
    return cls(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)


@pytest.mark.parametrize("opt, lr, wd", [("adam", 1e-3, 0.0), ("sgd", 1e-2, 0.0), ("adamw", 1e-2, 0.5)])
def test_mup_reproduces_fastwidth_losses(opt, lr, wd):
    cfg = _cfg(opt, lr, f"optim.weight_decay={wd}")
    fw, table = build_model(cfg, MLP_IO, seed=3)
    fw.double()
    twin = _mup_twin(fw, cfg)
    fw_opt = build_optimizer(fw, table, cfg)
    data = _data()
    with torch.no_grad():
        assert torch.allclose(fw(data[0][0]), twin(data[0][0]), atol=1e-12)   # MuReadout's α/m = the table's
    a, b = _losses(fw, fw_opt, data), _losses(twin, _mu_opt(opt, twin.parameters(), lr, wd), data)
    assert a[-1] < a[0] - 1e-3                                        # it trains
    assert _gap(a, b) <= 1e-6
    # the check can fail: the same twin under the optimizer without mup's scaling drifts away
    plain = _mup_twin(build_model(cfg, MLP_IO, seed=3)[0].double(), cfg)
    kw = dict(lr=lr, momentum=0.9) if opt == "sgd" else dict(lr=lr, betas=(0.9, 0.999), eps=1e-8)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[opt]
    assert _gap(a, _losses(plain, cls(plain.parameters(), weight_decay=wd, **kw), data)) > 1e-4
    if wd:  # and the weight decay is seen: the twin without it drifts away too
        no_wd = _mup_twin(build_model(cfg, MLP_IO, seed=3)[0].double(), cfg)
        assert _gap(a, _losses(no_wd, _mu_opt(opt, no_wd.parameters(), lr, 0.0), data)) > 1e-4


# ---------------------------------------------------------------- initial distributions

def _pooled(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def _assert_same_distribution(name: str, fw: torch.Tensor, mu: torch.Tensor, info) -> None:
    """fastwidth's draws `fw` and the mup twin's `mu` (pooled over seeds) against each other and
    against the table's row: constants alike; else the RMS within 5 standard errors (SE of an RMS of
    n draws ≤ rms·√(0.5/n), the normal's, the uniform's is smaller) and, for a uniform row, no draw
    beyond the bound √3·init_std on either side and the largest within 30/n of it
    (P(max < b(1 - ε)) = (1 - ε)^n ≈ e^-30)."""
    if info.init in ("zeros", "ones"):
        const = 0.0 if info.init == "zeros" else 1.0
        assert (fw == const).all() and (mu == const).all(), name
        return
    n1, n2 = fw.numel(), mu.numel()
    r1, r2, std = fw.square().mean().sqrt().item(), mu.square().mean().sqrt().item(), info.init_std
    assert abs(r1 - r2) <= 5 * std * math.sqrt(0.5 / n1 + 0.5 / n2), (name, r1, r2)
    assert abs(r1 - std) <= 5 * std * math.sqrt(0.5 / n1), (name, r1, std)
    if info.init == "uniform":
        bound = math.sqrt(3.0) * std
        for t in (fw, mu):
            top = t.abs().max().item()
            assert top <= bound * (1 + 1e-6), (name, top, bound)
            assert top >= bound * (1 - 30 / t.numel()), (name, top, bound)


def _mup_mlp_init(width: int, zero_readout: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = MupMLP(width, zero_readout=zero_readout)  # PyTorch's default init
    mup.set_base_shapes(model, MupMLP(BASE), delta=MupMLP(BASE * 2))   # and mup's rescale
    return model


@pytest.mark.parametrize("zero_readout", [False, True])
def test_torch_init_draws_what_mup_draws(zero_readout):
    seeds = range(4)
    for width in (64, 256):
        cfg = _cfg("adamw", 1e-3, f"model.width={width}", "param.init=torch", f"param.zero_readout={zero_readout}")
        fws = [build_model(cfg, MLP_IO, seed=s) for s in seeds]
        table = fws[0][1]
        mus = [dict(_mup_mlp_init(width, zero_readout, s).named_parameters()) for s in seeds]
        for name, info in table.items():
            fw = _pooled([dict(m.named_parameters())[name] for m, _ in fws])
            _assert_same_distribution(f"{name}@{width}", fw, _pooled([m[name] for m in mus]), info)
        assert table["layers.1.weight"].init == "uniform"
        assert (table["readout.weight"].init == "zeros") == zero_readout


def test_init_normal_is_not_mups_init():
    """The comparison can fail: today's N(0, σ²/fan_in) has √3 times the spread of mup's hidden weights."""
    fw = build_model(_cfg("adamw", 1e-3, "model.width=256"), MLP_IO, seed=0)
    mu = dict(_mup_mlp_init(256, False, 0).named_parameters())
    with pytest.raises(AssertionError):
        _assert_same_distribution("layers.1.weight", _pooled([fw[0].layers[1].weight]),
                                  _pooled([mu["layers.1.weight"]]), fw[1]["layers.1.weight"])


# ---------------------------------------------------------------- a µP GPT block against mup

VOCAB, SEQ, HEADS, GPT_BASE, GPT_WIDTH, GPT_STEPS = 61, 16, 2, 16, 64, 15


class MupBlock(nn.Module):
    """A pre-norm block written with nn layers; attention logits scaled attn_mult/d (mup's README)."""

    def __init__(self, width: int, attn_scale: float):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(width, eps=1e-6), nn.RMSNorm(width, eps=1e-6)
        self.attn = nn.Module()
        for part in "qkvo":
            setattr(self.attn, part, nn.Linear(width, width, bias=False))
        self.mlp = nn.Module()
        self.mlp.fc, self.mlp.proj = nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width, bias=False)
        self.attn_scale = attn_scale

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        h = self.norm1(x)
        q, k, v = (getattr(self.attn, p)(h).view(B, T, HEADS, C // HEADS).transpose(1, 2) for p in "qkv")
        q, k = rope_ref(q, cos, sin), rope_ref(k, cos, sin)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.attn_scale)
        x = x + self.attn.o(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp.proj(F.gelu(self.mlp.fc(self.norm2(x)), approximate="tanh"))


class MupGPT(nn.Module):
    def __init__(self, width: int, attn_scale: float | None = None, output_mult: float = 1.0):
        super().__init__()
        d, base_d = width // HEADS, GPT_BASE // HEADS
        scale = math.sqrt(base_d) / d if attn_scale is None else attn_scale   # µP: attn_mult / d
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList([MupBlock(width, scale)])
        self.norm_f = nn.RMSNorm(width, eps=1e-6)
        self.readout = mup.MuReadout(width, VOCAB, bias=False, output_mult=output_mult)
        cos, sin = rope_tables(SEQ, d, 10000.0)
        self.register_buffer("cos", cos.double(), persistent=False)
        self.register_buffer("sin", sin.double(), persistent=False)

    def forward(self, idx):
        x = self.embed(idx)  # (B, T, N)
        for b in self.blocks:
            x = b(x, self.cos, self.sin)
        return self.readout(self.norm_f(x))


def _gpt_cfg(*sets):
    return load_config(None, ["model.arch=gpt", "model.depth=1", f"model.n_heads={HEADS}", "model.act=gelu",
                              "model.norm=rms", f"model.width={GPT_WIDTH}", f"data.seq_len={SEQ}",
                              "param.kind=mup", f"param.base_width={GPT_BASE}", "param.output_mult=2.0",
                              "param.zero_readout=false", "optim.name=adamw", "optim.lr=3e-3",
                              "optim.weight_decay=0.1", "optim.grad_clip=0", *sets])


def _gpt_twin(fw_model, attn_scale=None):
    twin = MupGPT(GPT_WIDTH, attn_scale, output_mult=2.0)
    mup.set_base_shapes(twin, MupGPT(GPT_BASE), delta=MupGPT(GPT_BASE * 2))
    return _copy_into(twin, fw_model)


def test_mup_gpt_block_reproduces_fastwidth_losses():
    """Embedding (vector-like: Adam LR unchanged), attention with fixed heads (head_dim grows, so
    attn_mult/d differs from 1/√d), RMSNorm gains and MuReadout under MuAdamW with weight decay."""
    cfg = _gpt_cfg()
    io = type("IO", (), {"kind": "tokens", "vocab_size": VOCAB, "seq_len": SEQ})()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, VOCAB, (4, SEQ), generator=g), torch.randint(0, VOCAB, (4, SEQ), generator=g))
            for _ in range(GPT_STEPS)]
    with dispatch.using("torch"):  # float64 runs on the torch references
        fw, table = build_model(cfg, io, seed=1)
        fw.double()
        fw_opt = build_optimizer(fw, table, cfg)
        twin = _gpt_twin(fw)
        with torch.no_grad():
            assert torch.allclose(fw(data[0][0]), twin(data[0][0]), atol=1e-10)
        a = _losses(fw, fw_opt, data, lambda m, x, y: m.loss(x, y))
    ce = lambda m, x, y: F.cross_entropy(m(x).reshape(-1, VOCAB), y.reshape(-1))   # noqa: E731
    b = _losses(twin, mup.MuAdamW(twin.parameters(), lr=3e-3, weight_decay=0.1), data, ce)
    assert a[-1] < a[0] - 1e-2
    assert _gap(a, b) <= 1e-6
    # the check can fail: SP's 1/√d attention scale, or plain AdamW, drifts away
    sp_attn = _gpt_twin(build_model(cfg, io, seed=1)[0].double(), attn_scale=(GPT_WIDTH // HEADS) ** -0.5)
    assert _gap(a, _losses(sp_attn, mup.MuAdamW(sp_attn.parameters(), lr=3e-3, weight_decay=0.1), data, ce)) > 1e-4
    plain = _gpt_twin(build_model(cfg, io, seed=1)[0].double())
    assert _gap(a, _losses(plain, torch.optim.AdamW(plain.parameters(), lr=3e-3, weight_decay=0.1), data, ce)) > 1e-4


def test_gpt_torch_init_draws_what_mup_draws():
    """Embedding N(0, 1), q/k/v/o and MLP U(±1/√fan_in) by their own fan_in, gains 1, and the
    readout MuReadout's base-width U(±1/√base fan_in), at two widths."""
    io = type("IO", (), {"kind": "tokens", "vocab_size": VOCAB, "seq_len": SEQ})()
    for width in (64, 256):
        cfg = _gpt_cfg(f"model.width={width}", "param.init=torch")
        fws = [build_model(cfg, io, seed=s) for s in range(2)]
        mus = []
        for s in range(2):
            torch.manual_seed(s)
            twin = MupGPT(width)
            mup.set_base_shapes(twin, MupGPT(GPT_BASE), delta=MupGPT(GPT_BASE * 2))
            mus.append(dict(twin.named_parameters()))
        for name, info in fws[0][1].items():
            fw = _pooled([dict(m.named_parameters())[name] for m, _ in fws])
            _assert_same_distribution(f"{name}@{width}", fw, _pooled([m[name] for m in mus]), info)
        assert fws[0][1]["embed.weight"].init == "normal" and fws[0][1]["readout.weight"].init == "uniform"
