"""µP as data: the table against docs/design.md §3, mup == sp at base width, and the coordinate check."""
import math
from types import SimpleNamespace

import pytest
import torch

from fastwidth.config import for_width, load_config
from fastwidth.models import build_model
from fastwidth.param.optim import build_optimizer, lr_factor, set_lr
from fastwidth.param.scaling import attention_scale

MLP_IO = SimpleNamespace(kind="classes", in_shape=(12,), num_classes=5)
GPT_IO = SimpleNamespace(kind="tokens", vocab_size=61, seq_len=16)


def mlp_cfg(*sets):
    return load_config(None, ["model.arch=mlp", "model.depth=3", "param.base_width=32", *sets])


def gpt_cfg(*sets):
    return load_config(None, ["model.arch=gpt", "model.depth=2", "model.head_dim=16", "param.base_width=32",
                              "data.seq_len=16", *sets])


def table_for(cfg, io=MLP_IO):
    _, table = build_model(cfg, io)
    return table


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_mup_table_follows_microsoft_mup(opt):
    m = 4.0
    cfg = mlp_cfg("model.width=128", f"optim.name={opt}", "param.output_mult=2.0", "param.zero_readout=false")
    t = table_for(cfg)
    fan_hidden = 128
    inp, hid, out = t["layers.0.weight"], t["layers.1.weight"], t["readout.weight"]
    assert (inp.role, hid.role, out.role) == ("input", "hidden", "output")
    assert t["layers.1.bias"].role == "vector" and t["readout.bias"].role == "fixed"
    # init: input as at base (fan_in fixed), hidden 1/sqrt(fan_in), output the base-width std
    assert inp.init_std == pytest.approx(1 / math.sqrt(12))
    assert hid.init_std == pytest.approx(1 / math.sqrt(fan_hidden))
    assert out.init_std == pytest.approx(1 / math.sqrt(fan_hidden / m))
    # forward: MuReadout multiplies by output_mult / m
    assert out.forward_mult == pytest.approx(2.0 / m) and hid.forward_mult == 1.0 and inp.forward_mult == 1.0
    if opt == "adamw":  # MuAdam: hidden lr / m, hidden wd * m; the rest unchanged
        assert (hid.lr_mult, hid.wd_mult) == pytest.approx((1 / m, m))
        for name in ("layers.0.weight", "layers.1.bias", "readout.weight", "readout.bias"):
            assert (t[name].lr_mult, t[name].wd_mult) == (1.0, 1.0), name
    else:  # MuSGD: vector-like lr * m, wd / m; hidden and fixed unchanged
        assert (hid.lr_mult, hid.wd_mult) == (1.0, 1.0)
        assert (t["readout.bias"].lr_mult, t["readout.bias"].wd_mult) == (1.0, 1.0)
        for name in ("layers.0.weight", "layers.1.bias", "readout.weight"):
            assert (t[name].lr_mult, t[name].wd_mult) == pytest.approx((m, 1 / m)), name


def test_zero_init_options_and_other_kinds():
    t = table_for(mlp_cfg("model.width=128"))
    assert t["readout.weight"].init == "zeros"
    g = table_for(gpt_cfg("model.width=64", "param.zero_query=true"), GPT_IO)
    assert g["blocks.0.attn.q.weight"].init == "zeros" and g["blocks.0.attn.k.weight"].init == "normal"
    assert g["embed.weight"].role == "input" and g["blocks.0.norm1.weight"].role == "vector"
    sp = table_for(mlp_cfg("model.width=128", "param.kind=sp"))
    assert all(i.lr_mult == 1.0 and i.wd_mult == 1.0 for i in sp.values())
    assert sp["readout.weight"].init_std == pytest.approx(1 / math.sqrt(128)) and sp["readout.weight"].forward_mult == 1
    ntk = table_for(mlp_cfg("model.width=128", "param.kind=ntk"))
    assert ntk["layers.1.weight"].init_std == 1.0 and ntk["layers.1.weight"].forward_mult == pytest.approx(1 / math.sqrt(128))
    mf = table_for(mlp_cfg("model.width=128", "param.kind=mean_field", "param.gamma0=3.0"))
    mu = table_for(mlp_cfg("model.width=128"))
    for name in mu:
        assert mf[name].lr_mult == pytest.approx(3.0 * mu[name].lr_mult)
    assert mf["readout.weight"].forward_mult == pytest.approx(mu["readout.weight"].forward_mult / 3.0)
    mf_sgd = table_for(mlp_cfg("model.width=128", "param.kind=mean_field", "param.gamma0=3.0", "optim.name=sgd"))
    mu_sgd = table_for(mlp_cfg("model.width=128", "optim.name=sgd"))
    assert mf_sgd["layers.1.weight"].lr_mult == pytest.approx(9.0 * mu_sgd["layers.1.weight"].lr_mult)
    one = table_for(mlp_cfg("model.width=128", "param.kind=mean_field"))
    assert one == mu


def test_torch_init_is_pytorchs_default_through_the_table():
    """param.init=torch, from the rules: nn.Linear draws U(±1/√fan_in) for weight and bias; mup's
    set_base_shapes keeps hidden weights at their own fan_in and puts input/output weights and
    every bias at base width (bias ×√m, MuReadout ×√m); a zero readout zeroes its bias too."""
    m, r3 = 4.0, math.sqrt(3.0)   # a uniform on ±b has std b/√3
    t = table_for(mlp_cfg("model.width=128", "param.init=torch", "param.zero_readout=false"))
    expect = {"layers.0.weight": 1 / math.sqrt(12), "layers.0.bias": 1 / math.sqrt(12),
              "layers.1.weight": 1 / math.sqrt(128), "layers.1.bias": 1 / math.sqrt(128 / m),
              "readout.weight": 1 / math.sqrt(128 / m), "readout.bias": 1 / math.sqrt(128 / m)}
    for name, bound in expect.items():
        assert (t[name].init, t[name].init_std) == ("uniform", pytest.approx(bound / r3)), name
    zero = table_for(mlp_cfg("model.width=128", "param.init=torch"))
    assert zero["readout.weight"].init == zero["readout.bias"].init == "zeros"
    sp = table_for(mlp_cfg("model.width=128", "param.init=torch", "param.kind=sp"))
    assert sp["layers.1.bias"].init_std == pytest.approx(1 / math.sqrt(128) / r3)     # own fan_in
    assert sp["readout.weight"].init_std == pytest.approx(1 / math.sqrt(128) / r3)
    ntk = table_for(mlp_cfg("model.width=128", "param.init=torch", "param.kind=ntk", "param.init_std=2.0"))
    assert ntk["layers.1.weight"].init_std == pytest.approx(2.0 / r3)   # ×1/√fan_in in the forward
    normal = table_for(mlp_cfg("model.width=128"))
    assert normal["layers.1.bias"].init == "zeros" and normal["layers.1.weight"].init == "normal"
    g = table_for(gpt_cfg("model.width=64", "param.init=torch"), GPT_IO)
    assert (g["embed.weight"].init, g["embed.weight"].init_std) == ("normal", 1.0)   # nn.Embedding
    assert g["blocks.0.norm1.weight"].init == "ones"
    assert g["blocks.0.mlp.proj.weight"].init_std == pytest.approx(1 / math.sqrt(256) / r3)
    io = SimpleNamespace(kind="classes", in_shape=(3, 8, 8), num_classes=5)
    rn = table_for(load_config(None, ["model.arch=resnet", "model.depth=1", "model.width=16",
                                      "param.base_width=8", "param.init=torch"]), io)
    assert rn["stem.weight"].init_std == pytest.approx(1 / math.sqrt(27) / r3)     # conv: fan_in = cin·k·k
    assert rn["stages.0.0.conv1.weight"].init_std == pytest.approx(1 / math.sqrt(16 * 9) / r3)


def test_attention_scale_is_attn_mult_over_head_dim():
    assert attention_scale(gpt_cfg("model.width=64")) == pytest.approx(1 / 4)  # sqrt(16) / 16
    assert attention_scale(gpt_cfg("model.width=64", "param.attn_mult=2.0")) == pytest.approx(2 / 16)
    # fixed heads: head_dim grows with width, µP scale falls as 1/head_dim, SP as 1/sqrt(head_dim)
    fixed = ["model.n_heads=2", "sweep.widths=[32,128]"]
    assert attention_scale(gpt_cfg("model.width=128", *fixed)) == pytest.approx(math.sqrt(16) / 64)
    assert attention_scale(gpt_cfg("model.width=128", "param.kind=sp", *fixed)) == pytest.approx(1 / 8)


def _train(cfg, io, batches):
    model, table = build_model(cfg, io, seed=3)
    opt = build_optimizer(model, table, cfg)
    losses = []
    for t, (x, y) in enumerate(batches):
        set_lr(opt, cfg.optim, t, cfg.train.steps)
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return model, losses


@pytest.mark.parametrize("arch,opt,init", [("mlp", "adamw", "normal"), ("mlp", "sgd", "normal"),
                                           ("gpt", "adamw", "normal"), ("mlp", "adamw", "torch")])
def test_mup_equals_sp_bit_for_bit_at_base_width(arch, opt, init):
    g = torch.Generator().manual_seed(0)
    if arch == "mlp":
        io, make = MLP_IO, mlp_cfg
        batches = [(torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(4)]
    else:
        io, make = GPT_IO, gpt_cfg
        batches = [(torch.randint(0, 61, (3, 16), generator=g), torch.randint(0, 61, (3, 16), generator=g))
                   for _ in range(4)]
    common = ["model.width=32", f"optim.name={opt}", "optim.lr=0.01", "optim.weight_decay=0.1",
              "param.zero_readout=false", f"param.init={init}"]
    mup_model, mup_losses = _train(make(*common, "param.kind=mup"), io, batches)
    sp_model, sp_losses = _train(make(*common, "param.kind=sp"), io, batches)
    assert torch.equal(torch.stack(mup_losses), torch.stack(sp_losses))
    for (n, a), (_, b) in zip(mup_model.named_parameters(), sp_model.named_parameters()):
        assert torch.equal(a, b), n
    # and away from base width they differ (the test can fail)
    wide = _train(make(*common[1:], "model.width=64", "param.kind=mup"), io, batches)[1]
    wide_sp = _train(make(*common[1:], "model.width=64", "param.kind=sp"), io, batches)[1]
    assert not torch.equal(torch.stack(wide), torch.stack(wide_sp))


def test_lr_schedule_multiplies_and_never_overwrites_multipliers():
    cfg = mlp_cfg("model.width=128", "optim.lr=0.1", "optim.warmup_steps=4", "optim.schedule=cosine",
                  "train.steps=20", "optim.min_lr_ratio=0.1", "optim.weight_decay=0.5")
    model, table = build_model(cfg, MLP_IO)
    opt = build_optimizer(model, table, cfg)
    assert lr_factor(0, cfg.optim, 20) == pytest.approx(0.25)
    assert lr_factor(3, cfg.optim, 20) == pytest.approx(1.0)
    assert lr_factor(19, cfg.optim, 20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    for step in (0, 7, 19):
        f = set_lr(opt, cfg.optim, step, 20)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(0.1 * g["lr_mult"] * f)
            assert g["weight_decay"] == pytest.approx(0.5 * g["wd_mult"])
    hidden = [g for g in opt.param_groups if "layers.1.weight" in g["names"]][0]
    assert hidden["lr_mult"] == pytest.approx(0.25)
    lin = load_config(None, ["optim.schedule=linear", "optim.decay_steps=10"]).optim
    assert lr_factor(5, lin, 1000) == pytest.approx(0.5) and lr_factor(50, lin, 1000) == 0.0


def test_every_parameter_needs_a_role():
    from torch import nn
    from fastwidth.param.scaling import mup_table
    model, _ = build_model(mlp_cfg("model.width=64"), MLP_IO)
    model.extra = nn.Linear(3, 3)
    with pytest.raises(TypeError, match="without a µP role"):
        mup_table(model, mlp_cfg("model.width=64"))


def _coord(kind):
    from fastwidth.stats.coord import coord_check
    cfg = load_config(None, ["model.arch=mlp", "model.depth=3", "param.base_width=64", f"param.kind={kind}",
                             "data.source=synthetic", "data.batch_size=64", "data.in_dim=32", "optim.lr=0.01",
                             "optim.grad_clip=0"])
    return coord_check(cfg, [64, 128, 256, 512, 1024], steps=3, seeds=(0, 1))


@pytest.mark.slow
def test_coordinate_check_mup_flat_sp_grows():
    from fastwidth.stats.coord import spread
    mup, sp = _coord("mup"), _coord("sp")
    for name, layer in mup["layers"].items():
        assert spread(layer["update_rms"]) < 1.5, (name, layer["update_rms"])
    for name in ("layers.1", "layers.2", "readout"):
        ups = sp["layers"][name]["update_rms"]
        assert all(b > a for a, b in zip(ups, ups[1:])), (name, ups)
        assert ups[-1] / ups[0] > 4, (name, ups)  # 16x wider: updates grow with width


def test_readme_tables_are_generated_from_the_code():
    from pathlib import Path
    from fastwidth.param.doc import render
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert render(readme) == readme, "README is stale: run python -m fastwidth.param.doc"
    assert "| mup | hidden (q/k/v/o, MLP, conv) | 1 | 1 | η/m | η | wd·m | wd |" in readme


@pytest.mark.parametrize("init", ["normal", "torch"])
def test_same_seed_models_at_two_widths_are_independent_draws(init):
    """The narrow model must not be a slice of the wide one: a width in the seed makes the first
    layer's overlapping block uncorrelated (|r| within 5 standard errors of 0) while two draws at
    one width and seed are identical."""
    cfg = mlp_cfg(f"param.init={init}")
    narrow = dict(build_model(for_width(cfg, 64), MLP_IO, seed=0)[0].named_parameters())
    wide = dict(build_model(for_width(cfg, 128), MLP_IO, seed=0)[0].named_parameters())
    again = dict(build_model(for_width(cfg, 128), MLP_IO, seed=0)[0].named_parameters())
    for name, p in narrow.items():
        if p.abs().sum() == 0:
            continue
        if p.dim() < 2:  # biases (init=torch): the overlapping entries
            r = torch.corrcoef(torch.stack([p.detach(), wide[name][: p.shape[0]].detach()]))[0, 1].item()
            assert abs(r) < 5 / math.sqrt(p.numel()), (name, r)
            continue
        w = wide[name][: p.shape[0], : p.shape[1]].reshape(-1)
        a = p.detach().reshape(-1)
        r = torch.corrcoef(torch.stack([a, w]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(a.numel()), (name, r)
        assert torch.equal(wide[name], again[name])


@pytest.mark.parametrize("how", ["normal", "uniform"])
@pytest.mark.parametrize("shape", [(1823, 7), (130,), (64, 3, 3, 3), (5, 781)])
def test_init_rows_and_flat_slices_equal_the_full_draw(shape, how):
    """A shard drawn alone (dim-0 rows for FSDP2, a flat range for ZeRO-3) equals the same slice of
    the whole tensor, for ranges that cut row blocks anywhere."""
    from fastwidth.param.scaling import ParamInfo, draw_init, draw_init_flat
    info = ParamInfo(name="blocks.0.w", shape=shape, role="hidden", init=how, init_std=0.5,
                     lr_mult=1.0, wd_mult=1.0, forward_mult=1.0)
    full = draw_init(info, seed=3, width=256)
    assert full.shape == shape and abs(full.std().item() - 0.5) < 0.1
    if how == "uniform":  # U(±√3·std)
        assert full.abs().max().item() <= 0.5 * math.sqrt(3) * (1 + 1e-6)
    g = torch.Generator().manual_seed(0)
    n_rows, numel = shape[0], full.numel()
    for _ in range(20):
        a, b = sorted(torch.randint(0, n_rows + 1, (2,), generator=g).tolist())
        assert torch.equal(draw_init(info, 3, 256, (a, b)), full[a:b])
        a, b = sorted(torch.randint(0, numel + 1, (2,), generator=g).tolist())
        assert torch.equal(draw_init_flat(info, 3, 256, a, b), full.reshape(-1)[a:b])
    assert not torch.equal(draw_init(info, 3, 512), full)   # the width is in the seed
    assert not torch.equal(draw_init(info, 4, 256), full)   # and so is the seed
