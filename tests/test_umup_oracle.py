"""param.kind=umup against the `unit-scaling` package (Graphcore's u-µP, Blake et al. 2024) as oracle.

The package tags each parameter (mup_type from its module class, mup_scaling_depth from the
DepthModuleList it sits in); a twin of fastwidth's GPT built from its modules, under the same
names, gives lr_scale_func_adam per parameter. Its functional ops give the forward scales, its
transformer_residual_scaling_rule the residual τ's, and its AdamW (independent decay) a step to
match on a small MLP.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastwidth.config import load_config
from fastwidth.errors import ConfigError
from fastwidth.models import build_meta, build_model
from fastwidth.param.optim import build_optimizer, set_lr
from fastwidth.param.scaling import mup_table

uu = pytest.importorskip("unit_scaling", reason="the oracle is the PyPI package unit-scaling (pip install '.[test]')")
from unit_scaling.core.functional import transformer_residual_scaling_rule  # noqa: E402
from unit_scaling.optim import lr_scale_func_adam  # noqa: E402

IO = SimpleNamespace(kind="tokens", vocab_size=61, seq_len=16)
SHAPES = [(64, 2), (96, 2), (64, 6), (160, 5)]  # (width, depth)


def gpt(width, depth, *sets):
    return load_config(None, ["model.arch=gpt", "model.head_dim=16", "param.base_width=32", "param.kind=umup",
                              "model.norm=layer", "model.bias=true", "model.act=swiglu", "data.seq_len=16",
                              f"model.width={width}", f"model.depth={depth}", *sets])


def unit_scaling_twin(width, depth, vocab, hidden):
    """fastwidth's GPT (layer norm, biases, SwiGLU) from unit_scaling's modules, same names."""
    def block():
        b = nn.Module()
        b.norm1, b.norm2 = (uu.LayerNorm(width, elementwise_affine=True) for _ in range(2))
        b.attn = nn.ModuleDict({k: uu.Linear(width, width, bias=True) for k in "qkvo"})
        b.mlp = nn.ModuleDict({"fc": uu.Linear(width, hidden, bias=True), "gate": uu.Linear(width, hidden, bias=True),
                               "proj": uu.Linear(hidden, width, bias=True)})
        return b
    twin = nn.Module()
    twin.embed = uu.Embedding(vocab, width)
    twin.blocks = uu.DepthModuleList([block() for _ in range(depth)])  # sets mup_scaling_depth = depth
    twin.norm_f = uu.LayerNorm(width, elementwise_affine=True)
    twin.readout = uu.LinearReadout(width, vocab)
    return twin


def forward_scale(name, p, twin_module):
    """The package's output scale of the layer owning weight `p`: its op on x over F's."""
    x = torch.randn(3, p.shape[1], dtype=torch.float64)
    w = p.detach().double()
    op = uu.functional.linear_readout if name == "readout.weight" else uu.functional.linear
    return (op(x, w, None) / F.linear(x, w)).mean().item()


@pytest.mark.parametrize("width,depth", SHAPES)
def test_umup_table_matches_unit_scaling(width, depth):
    cfg = gpt(width, depth)
    model = build_meta(cfg, IO)
    table = mup_table(model, cfg)
    twin = unit_scaling_twin(width, depth, IO.vocab_size, 4 * width)
    modules = dict(twin.named_modules())
    names = {n for n, _ in model.named_parameters()}
    # the twin has every parameter but the readout bias fastwidth's GPT lacks too
    assert names == {n for n, _ in twin.named_parameters()}
    matched = 0
    for name, p in twin.named_parameters():
        info = table[name]
        assert tuple(p.shape) == info.shape, name
        owner = modules[name.rsplit(".", 1)[0]]
        want_lr = lr_scale_func_adam(p)
        if name.endswith(".bias") and isinstance(owner, uu.Linear):
            # the package scales the bias with the matmul; fastwidth's bias is unscaled, so the
            # same steps on its contribution need the LR × the layer's forward scale
            want_lr *= forward_scale(name, owner.weight, owner)
        assert info.lr_mult == pytest.approx(want_lr, rel=1e-12), name
        if p.dim() == 2 and name != "embed.weight":
            assert info.forward_mult == pytest.approx(forward_scale(name, p, owner), rel=1e-12), name
            assert (info.init, info.init_std) == ("normal", 1.0), name  # unit init: uu.Linear's normal_
        assert info.wd_mult == 1.0  # u-µP's decay is independent: no width factor
        assert info.branch_mult == (depth ** -0.5 if name.startswith("blocks.") else 1.0)
        matched += 1
    assert matched == 4 + 18 * depth
    assert table["embed.weight"].forward_mult == 1.0  # unit_scaling.functional.embedding: no forward scale


def test_residual_taus_are_branch_multipliers_ahead_of_pre_norm_blocks():
    """transformer_residual_scaling_rule's τ with the skip renormalized (residual_split/add) is,
    ahead of pre-norm branches and a final norm, x + b_i·f_i(x) with b_i = τ_i Π_{k<i} √(1+τ_k²):
    b_i = depth^-½ for every branch (fastwidth's umup branch_mult), checked by the τ's and by
    running the package's residual ops against fastwidth's form."""
    def rms(x):  # scale-invariant pre-norm (no ε)
        return x / x.pow(2).mean(-1, keepdim=True).sqrt()
    for depth in (2, 5, 12):
        rule = transformer_residual_scaling_rule()
        taus = [rule(i, 2 * depth) for i in range(2 * depth)]
        b = [t * math.prod(math.sqrt(1 + s * s) for s in taus[:i]) for i, t in enumerate(taus)]
        branch = mup_table(build_meta(gpt(64, depth), IO), gpt(64, depth))["blocks.0.attn.q.weight"].branch_mult
        assert b == pytest.approx([branch] * (2 * depth), rel=1e-12) and branch == pytest.approx(depth ** -0.5)
        g = torch.Generator().manual_seed(depth)
        ws = [torch.randn(24, 24, generator=g, dtype=torch.float64) / 24 ** 0.5 for _ in taus]
        x0 = torch.randn(5, 24, generator=g, dtype=torch.float64)
        x_pkg, x_fw = x0, x0
        for w, tau in zip(ws, taus):
            residual, skip = uu.functional.residual_split(x_pkg, tau)
            x_pkg = uu.functional.residual_add(rms(residual) @ w.T, skip, tau)
            x_fw = x_fw + branch * (rms(x_fw) @ w.T)
        torch.testing.assert_close(rms(x_pkg), rms(x_fw), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(rms(x_pkg), rms(x0 + sum(rms(x0) @ w.T for w in ws)))


def test_umup_adamw_steps_match_unit_scaling_adamw():
    """A fastwidth MLP under umup (one input layer, the readout, biases) and its unit_scaling twin
    (uu.Linear, uu.LinearReadout, uu.optim.AdamW with independent decay) from the same weights take
    the same 4 steps: equal outputs (the package's backward scales change each tensor's gradient by
    a constant, which Adam ignores but for ε: ε = 1e-12 here)."""
    cfg = load_config(None, ["model.arch=mlp", "model.depth=1", "model.width=48", "param.base_width=16",
                             "param.kind=umup", "optim.lr=0.02", "optim.eps=1e-12", "optim.eps_scaling=none",
                             "optim.weight_decay=0.05", "optim.weight_decay_mode=independent", "train.steps=4",
                             "optim.grad_clip=0"])
    model, table = build_model(cfg, SimpleNamespace(kind="classes", in_shape=(7,), num_classes=5), seed=0)
    twin = nn.Sequential(uu.Linear(7, 48, bias=True), nn.ReLU(), uu.LinearReadout(48, 5, bias=True))
    with torch.no_grad():
        for (_, p), q in zip(model.named_parameters(), twin.parameters()):
            q.copy_(p)
    opt = build_optimizer(model, table, cfg)
    twin_opt = uu.optim.AdamW(twin.parameters(), lr=0.02, eps=1e-12, weight_decay=0.05)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 7, generator=g), torch.randint(0, 5, (16,), generator=g)
    torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-6)
    for t in range(4):
        set_lr(opt, cfg.optim, t, 4)
        for m, o in ((model, opt), (twin, twin_opt)):
            F.cross_entropy(m(x), y).backward()
            o.step()
            o.zero_grad()
        torch.testing.assert_close(model(x), twin(x), rtol=1e-4, atol=1e-5, msg=f"step {t + 1}")


@pytest.mark.parametrize("sets,what", [(("model.arch=resnet",), "model.arch=resnet"),
                                       (("param.init=torch",), "param.init=torch"),
                                       (("optim.weight_decay=0.1",), "weight_decay_mode=coupled")])
def test_umup_outside_its_table_is_refused_in_one_line(sets, what):
    with pytest.raises(ConfigError, match=f"param.kind=umup does not cover .*{what}") as e:
        load_config(None, ["param.kind=umup", *sets])
    assert "\n" not in str(e.value)
