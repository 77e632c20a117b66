"""The depth kinds' tables (depth_mup, completep) checked against the issue's rules, written here.

With m_N = width / base_width, m_L = depth / base_depth and α (½, 1 or param.depth_alpha):
    residual branch output (every parameter inside a block)   × m_L^-α
    hidden matrices: Adam LR m_N^-1 m_L^(α-1), WD m_N, ε m_N^-1 m_L^-α, init σ/√fan_in
    norm gains and biases inside blocks: LR m_L^(α-1), WD 1, ε m_N^-1 m_L^-α
    embedding, final norm, readout: LR 1, WD 1, ε m_N^-1; readout forward output_mult / m_N
    init: no depth factor
(optim.eps_scaling=none drops the m_N^-1 of ε; weight_decay_mode=independent makes every WD 1.)
"""
import functools
import math
from types import SimpleNamespace

import pytest
import torch

from fastwidth.config import load_config
from fastwidth.errors import ConfigError
from fastwidth.models import build_meta, build_model
from fastwidth.param.optim import build_optimizer, lr_factor, param_groups, set_lr, timescales
from fastwidth.param.scaling import mup_table

IO = SimpleNamespace(kind="tokens", vocab_size=61, seq_len=16)
SIGMA, EMBED_STD, OUT_MULT = 0.7, 0.9, 1.5


def gpt(*sets):
    return load_config(None, ["model.arch=gpt", "model.head_dim=16", "param.base_width=32", "param.base_depth=2",
                              "model.norm=layer", "model.bias=true", "model.act=swiglu", "data.seq_len=16",
                              f"param.init_std={SIGMA}", f"param.embed_std={EMBED_STD}",
                              f"param.output_mult={OUT_MULT}", "param.zero_readout=false", *sets])


def expected(name: str, shape: tuple, width: int, depth: int, alpha: float, eps_width=True, independent=False):
    """The row the rules above give for one GPT parameter (which layer it is: from its name)."""
    mN, mL = width / 32, depth / 2
    eps_n = 1 / mN if eps_width else 1.0
    if not name.startswith("blocks."):
        if name == "embed.weight":
            init = EMBED_STD
        elif name == "readout.weight":  # zero_readout=false: the base width's std
            init = SIGMA / math.sqrt(shape[1] / mN)
        else:  # final norm: gain 1, shift 0
            init = 0.0
        fwd = OUT_MULT / mN if name == "readout.weight" else 1.0
        return dict(lr_mult=1.0, wd_mult=1.0, eps_mult=eps_n, branch_mult=1.0, forward_mult=fwd, init_std=init)
    branch, eps = mL ** -alpha, eps_n * mL ** -alpha
    if name.endswith(".weight") and len(shape) == 2:  # q, k, v, o, fc, gate, proj
        return dict(lr_mult=mL ** (alpha - 1) / mN, wd_mult=1.0 if independent else mN, eps_mult=eps,
                    branch_mult=branch, forward_mult=1.0, init_std=SIGMA / math.sqrt(shape[1]))
    return dict(lr_mult=mL ** (alpha - 1), wd_mult=1.0, eps_mult=eps, branch_mult=branch, forward_mult=1.0,
                init_std=0.0)


@functools.lru_cache(maxsize=None)
def _meta(sets: tuple):
    return build_meta(gpt(*sets), IO)


CASES = [("depth_mup", None, 0.5), ("completep", None, 1.0), ("completep", 0.75, 0.75), ("depth_mup", 0.25, 0.25)]


@pytest.mark.parametrize("kind,override,alpha", CASES)
@pytest.mark.parametrize("extra", [(), ("optim.eps_scaling=none",),
                                   ("optim.weight_decay_mode=independent", "optim.weight_decay=0.1")])
def test_every_gpt_parameter_follows_the_depth_rules(kind, override, alpha, extra):
    checked = 0
    for width in (64, 128):
        for depth in (2, 8):
            sets = [f"param.kind={kind}", f"model.width={width}", f"model.depth={depth}", *extra]
            if override is not None:
                sets.append(f"param.depth_alpha={override}")
            cfg = gpt(*sets)
            model = _meta(tuple(s for s in sets if s not in extra))  # the optim keys leave the model as it is
            table = mup_table(model, cfg)
            assert set(table) == {n for n, _ in model.named_parameters()}
            for name, p in model.named_parameters():
                want = expected(name, tuple(p.shape), width, depth, alpha,
                                eps_width="optim.eps_scaling=none" not in extra,
                                independent="optim.weight_decay_mode=independent" in extra)
                got = table[name]
                for field, value in want.items():
                    assert getattr(got, field) == pytest.approx(value, rel=1e-12, abs=0), (width, depth, name, field)
                checked += 1
            # the model applies the table's branch multiplier (m_L^-α) to every block's branches
            assert all(b.branch == pytest.approx((depth / 2) ** -alpha, rel=1e-12) for b in model.blocks)
    assert checked == 2 * (4 + 18 * 2 + 4 + 18 * 8)  # embed, final norm (2), readout + 18 a block


def test_mup_table_cli_rows_carry_eps_and_branch(capsys):
    import json
    from fastwidth.cli import main
    sets = ["model.arch=gpt", "model.head_dim=16", "model.width=64", "model.depth=8", "param.base_width=32",
            "param.kind=completep"]
    assert main(["mup-table", "--format", "jsonl", "--set", *sets]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["blocks.3.mlp.fc.weight"]["branch_mult"] == pytest.approx(1 / 4)  # m_L = 4, α = 1
    assert rows["blocks.3.mlp.fc.weight"]["eps_mult"] == pytest.approx(1 / 8)     # m_N^-1 m_L^-1
    assert (rows["embed.weight"]["branch_mult"], rows["embed.weight"]["eps_mult"]) == (1.0, 0.5)


def test_kinds_with_an_adam_table_only_refuse_sgd_in_one_line():
    for kind in ("depth_mup", "completep", "umup"):
        with pytest.raises(ConfigError, match=f"param.kind={kind} has an Adam table only") as e:
            gpt(f"param.kind={kind}", "optim.name=sgd")
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad,match", [
    (("param.kind=mup", "param.depth_alpha=0.5"), "param.depth_alpha=0.5 sets the residual exponent"),
    (("param.kind=sp", "optim.eps_scaling=width"), "optim.eps_scaling=width scales"),
    (("optim.name=adam", "optim.weight_decay_mode=independent"), "weight_decay_mode=independent is AdamW's")])
def test_param_and_optim_combinations_outside_the_tables_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match) as e:
        gpt(*bad)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- depth = base_depth is mup

def _train(cfg, batches):
    """Initial parameters, logits and parameters after Adam steps, through build_optimizer/set_lr."""
    model, table = build_model(cfg, IO, seed=5)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = model(batches[0][0]).detach()
    opt = build_optimizer(model, table, cfg)
    for t, (x, y) in enumerate(batches):
        set_lr(opt, cfg.optim, t, cfg.train.steps)
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad()
    return table, init, logits, dict(model.named_parameters())


def test_at_base_depth_every_depth_kind_is_mup_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 61, (3, 16), generator=g), torch.randint(0, 61, (3, 16), generator=g))
               for _ in range(2)]
    common = ["model.width=48", "model.depth=3", "param.base_depth=3", "optim.lr=0.01", "optim.weight_decay=0.1",
              "optim.eps_scaling=width", "optim.eps=1e-4", "train.steps=2"]
    ref = _train(gpt(*common, "param.kind=mup"), batches)
    for kind, override in (("depth_mup", None), ("completep", None), ("completep", 0.3)):
        sets = [*common, f"param.kind={kind}"] + ([f"param.depth_alpha={override}"] if override else [])
        table, init, logits, final = _train(gpt(*sets), batches)
        assert {n: r.row() for n, r in table.items()} == {n: r.row() for n, r in ref[0].items()}, kind
        assert all(torch.equal(init[n], ref[1][n]) for n in init), kind
        assert torch.equal(logits, ref[2]), kind
        assert all(torch.equal(final[n].detach(), ref[3][n].detach()) for n in final), kind
    # one block deeper, completep moves away from mup (the comparison can fail)
    deeper = [c for c in common if not c.startswith("model.depth")] + ["model.depth=4"]
    x = batches[0][0]
    assert not torch.equal(build_model(gpt(*deeper, "param.kind=completep"), IO, seed=5)[0](x),
                           build_model(gpt(*deeper, "param.kind=mup"), IO, seed=5)[0](x))


# --------------------------------------------------------------------------- ε and weight decay

def _adamw_by_hand(p, grads, lr_t, decay_t, eps, betas=(0.9, 0.999)):
    """AdamW written out: p ← p·(1 − decay_t) − lr_t · m̂ / (√v̂ + ε), decay_t the step's decay."""
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, gr in enumerate(grads, start=1):
        p = p * (1 - decay_t[t - 1])
        m = betas[0] * m + (1 - betas[0]) * gr
        v = betas[1] * v + (1 - betas[1]) * gr * gr
        p = p - lr_t[t - 1] * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return p


@pytest.mark.parametrize("mode", ["coupled", "independent"])
@pytest.mark.parametrize("fused", [True, False])
def test_weight_decay_modes_and_group_eps_against_adamw_by_hand(mode, fused):
    """A tiny µP MLP (width 16, base 8), 4 steps under a warmup + cosine schedule, every parameter
    against AdamW by hand with its group's lr, ε and decay
    (coupled: lr_t·wd·wd_mult; independent: wd·wd_mult·schedule(t), not riding on the LR)."""
    cfg = load_config(None, ["model.arch=mlp", "model.depth=2", "model.width=16", "param.base_width=8",
                             "optim.eps_scaling=width", "optim.eps=1e-3", "optim.lr=0.02", "optim.weight_decay=0.3",
                             f"optim.weight_decay_mode={mode}", "optim.warmup_steps=2", "optim.schedule=cosine",
                             "optim.min_lr_ratio=0.1", "train.steps=4", "param.zero_readout=false"])
    model, table = build_model(cfg, SimpleNamespace(kind="classes", in_shape=(5,), num_classes=3), seed=1)
    if fused:
        opt = build_optimizer(model, table, cfg)
        assert all(g["fused"] for g in opt.param_groups)
    else:
        opt = torch.optim.AdamW(param_groups(model, table), lr=1.0, eps=1.0, foreach=False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    grads = {n: [torch.randn(p.shape, generator=g) for _ in range(4)] for n, p in model.named_parameters()}
    for t in range(4):
        set_lr(opt, cfg.optim, t, 4)
        for n, p in model.named_parameters():
            p.grad = grads[n][t].clone()
        opt.step()
    oc = cfg.optim
    assert len({g["eps"] for g in opt.param_groups}) == 1  # an MLP has no branch: one ε, × base/width
    for n, p in model.named_parameters():
        info = table[n]
        assert info.eps_mult == 0.5
        lr_t = [oc.lr * info.lr_mult * lr_factor(t, oc, 4) for t in range(4)]
        wd = oc.weight_decay * info.wd_mult
        decay = [wd * lr_factor(t, oc, 4) for t in range(4)] if mode == "independent" else [lr * wd for lr in lr_t]
        want = _adamw_by_hand(start[n], grads[n], lr_t, decay, oc.eps * info.eps_mult)
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7, msg=n)
    if mode == "independent":  # the decay a step is wd × schedule: no width factor on any group
        assert {info.wd_mult for info in table.values()} == {1.0}


def test_independent_decay_at_zero_lr_is_zero_and_timescales_per_group():
    cfg = gpt("param.kind=completep", "model.width=64", "model.depth=8", "optim.weight_decay=0.1",
              "optim.lr=0.01", "optim.schedule=linear", "train.steps=4", "optim.weight_decay_mode=independent")
    model, table = build_model(cfg, IO, seed=0)
    opt = build_optimizer(model, table, cfg)
    assert set_lr(opt, cfg.optim, 4, 4) == 0.0  # the end of a linear decay: lr 0, decay 0 (no 0/0)
    assert all(g["lr"] == 0.0 and g["weight_decay"] == 0.0 for g in opt.param_groups)
    rows = timescales(table, cfg.optim)
    assert sum(r["params"] for r in rows) == len(table) and len(rows) == len(opt.param_groups)
    assert all(r["tau"] == pytest.approx(1 / 0.1) for r in rows)  # independent: τ = 1 / λ_step
    coupled = gpt("param.kind=completep", "model.width=64", "model.depth=8", "optim.weight_decay=0.1",
                  "optim.lr=0.01")
    table_c = mup_table(build_meta(coupled, IO), coupled)
    for r in timescales(table_c, coupled.optim):  # τ = 1 / (η λ), η the group's peak LR
        info = table_c[r["first"]]
        assert r["tau"] == pytest.approx(1 / (0.01 * info.lr_mult * 0.1 * info.wd_mult))


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_stacked_step_takes_each_groups_eps(cls):
    """The stacked seeds' Adam(W) step (param/stacked_optim.py) on (S, ...) tensors against each
    member's own fused step, two groups whose ε differ 100× (as eps_mult makes them), 1e-6."""
    from fastwidth.param.stacked_optim import StackedStep, why_not
    S, shapes = 3, {"w": (3, 5), "g": (5,)}
    gen = torch.Generator().manual_seed(0)
    stacked = {n: torch.randn((S, *sh), generator=gen) for n, sh in shapes.items()}
    own = [{n: torch.nn.Parameter(stacked[n][i].clone()) for n in shapes} for i in range(S)]
    members = [{n: torch.nn.Parameter(stacked[n][i].clone()) for n in shapes} for i in range(S)]

    def opt_of(ps):
        return cls([{"params": [ps["w"]], "eps": 1e-2}, {"params": [ps["g"]], "eps": 1e-4}], lr=0.05,
                   weight_decay=0.1, fused=True)
    opts, own_opts = [opt_of(ps) for ps in members], [opt_of(ps) for ps in own]
    assert why_not(opts) is None  # groups with their own ε stack (they fell back to per-member steps)
    step = StackedStep(stacked, members, opts)
    for _ in range(3):
        grads = {n: 1e-2 * torch.randn((S, *sh), generator=gen) for n, sh in shapes.items()}
        for n in shapes:
            stacked[n].grad = grads[n].clone()
            for i in range(S):
                own[i][n].grad = grads[n][i].clone()
        step.step()
        for o in own_opts:
            o.step()
    for n in shapes:
        for i in range(S):
            torch.testing.assert_close(stacked[n][i], own[i][n].detach(), rtol=1e-6, atol=1e-6)


def test_a_run_writes_each_groups_timescale(tmp_path):
    """metrics.jsonl's "optim" row (one a member, at the start): every group's τ = 1/(η λ)."""
    from test_stacked import TINY_MLP
    from fastwidth.run.metrics import read_metrics
    from fastwidth.trainer.loop import run
    cfg = load_config(None, [*TINY_MLP, "sweep.widths=[32]", "sweep.seeds=[0]", "train.steps=1", "stats.enabled=false",
                             "optim.weight_decay=0.1", "optim.lr=0.01", f"train.out_dir={tmp_path / 'run'}"])
    rows = [r for r in read_metrics(run(cfg) / "metrics.jsonl") if r["kind"] == "optim"]
    assert len(rows) == 1 and rows[0]["width"] == 32 and rows[0]["weight_decay_mode"] == "coupled"
    taus = sorted(g["tau"] for g in rows[0]["groups"])  # mup at m = 2: hidden η/2 and λ·2, the rest η and λ
    assert taus == pytest.approx([1 / (0.01 * 0.1)] * len(taus))
