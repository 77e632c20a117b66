"""The depth kinds' residual branch multiplier m_L^-α (issue 30) where each model runs.

The rule (DESIGN §3; Dey et al. 2025): every residual branch's whole output, bias included, is
× m_L^-α, m_L = depth / base_depth. The reference below applies it as written, a hook multiplying
the output of each branch (attention, MLP: the output of their last layer; ResNet: the BasicBlock's
bn2) on the torch path in fp32; the model under test folds it into attn.o's and mlp.proj's GEMM
alpha and bias (MuLinear.branch) or into the residual add's alpha (ResNet), on each kernel path.
"""
import contextlib
import copy
import re
from types import SimpleNamespace

import pytest
import torch

from fastwidth.config import Config, validate
from fastwidth.errors import ConfigError
from fastwidth.kernels import dispatch, native
from fastwidth.models import build_model
from fastwidth.models.stacked import Stack
from fastwidth.nn.layers import MuLinear
from fastwidth.trainer.loop import run
from tests.test_stacked import TINY_GPT, _assert_runs_match, cfg_of

GPT_IO = SimpleNamespace(kind="tokens", vocab_size=29, seq_len=7)  # odd vocabulary and sequence length
NO_NATIVE = pytest.mark.skipif(not native.available(), reason="the native ops did not build")
PATHS = ["torch", pytest.param("native", marks=NO_NATIVE),
         pytest.param("triton", marks=pytest.mark.slow)]  # the Triton interpreter: 30-70 s a test here


def gpt_cfg(kind="completep", depth=4, base_depth=3, bias=False):
    """A GPT of width 48 (3 heads of 16: Triton attention's smallest head_dim); bias=True also
    takes LayerNorm and SwiGLU, so both norms and both MLPs are covered."""
    c = Config()
    c.model.arch, c.model.width, c.model.depth, c.model.head_dim, c.model.mlp_ratio = "gpt", 48, depth, 16, 2
    c.model.norm, c.model.act, c.model.bias = ("layer", "swiglu", True) if bias else ("rms", "gelu", False)
    c.param.kind, c.param.base_depth, c.param.base_width, c.param.zero_readout = kind, base_depth, 16, False
    return c


def built(cfg, io=GPT_IO, seed=0):
    """The model with every parameter moved off its init (zero biases, unit gains and a zero
    readout would hide a multiplier applied to the wrong term)."""
    model, table = build_model(cfg, io, seed=seed)
    g = torch.Generator().manual_seed(5 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model, table


def by_the_rule(model, ends: str, beta: float):
    """A copy of `model` with nothing folded (every `branch` attribute 1) whose modules matching
    `ends` (the last layer of each residual branch) multiply their whole output by beta."""
    ref = copy.deepcopy(model)
    for name, mod in ref.named_modules():
        if hasattr(mod, "branch"):
            mod.branch = 1.0
        if re.search(ends, name):
            mod.register_forward_hook(lambda m, i, out: out * beta)
    return ref


GPT_ENDS = r"\.(attn\.o|mlp\.proj)$"
RESNET_ENDS = r"\.bn2$"


def loss_and_grads(model, x, y, backend="torch", bf16=False):
    model.zero_grad(set_to_none=True)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with dispatch.using(backend), amp:
        loss = model.loss(x, y)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def tokens(io=GPT_IO, batch=2):
    t = torch.randint(0, io.vocab_size, (batch, io.seq_len + 1), generator=torch.Generator().manual_seed(1))
    return t[:, :-1], t[:, 1:]


def max_rel(a: dict, b: dict) -> float:
    """Largest |a - b| of any tensor relative to b's largest entry."""
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)).item() for n in b)


# --------------------------------------------------------------------------- GPT, every kernel path

@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("bias", [False, True])
def test_gpt_branch_fold_equals_the_rule_fp32(backend, bias):
    model, _ = built(gpt_cfg(bias=bias))
    beta = (4 / 3) ** -1.0  # completep, depth 4 over base depth 3
    ref = by_the_rule(model, GPT_ENDS, beta)
    x, y = tokens()
    want_loss, want = loss_and_grads(ref, x, y)
    loss, got = loss_and_grads(model, x, y, backend)
    unscaled, _ = loss_and_grads(by_the_rule(model, GPT_ENDS, 1.0), x, y)
    assert abs(unscaled - want_loss) > 1e-3  # the multiplier moves the loss: the comparison can fail
    err = max_rel(got, want)
    print(f"\n{backend} fp32 bias={bias}: |dloss| {abs(loss - want_loss).item():.2e}, max rel dgrad {err:.2e}")
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
    assert err <= 2e-5


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("bias", [False, True])
def test_gpt_branch_fold_follows_the_rule_under_bf16_autocast(backend, bias):
    """Within twice what bf16 autocast itself moves the rule's own loss and gradients from fp32."""
    model, _ = built(gpt_cfg(bias=bias))
    ref = by_the_rule(model, GPT_ENDS, 0.75)
    x, y = tokens()
    l32, g32 = loss_and_grads(ref, x, y)
    want_loss, want = loss_and_grads(ref, x, y, bf16=True)
    loss, got = loss_and_grads(model, x, y, backend, bf16=True)
    gap_loss, gap = abs(want_loss - l32).item(), max_rel(want, g32)
    err = max_rel(got, want)
    print(f"\n{backend} bf16 bias={bias}: |dloss| {abs(loss - want_loss).item():.2e} (bf16 gap {gap_loss:.2e}), "
          f"max rel dgrad {err:.2e} (bf16 gap {gap:.2e})")
    assert abs(loss - want_loss).item() <= 2 * gap_loss + 1e-3
    assert err <= 2 * gap


@pytest.mark.parametrize("backend", PATHS)
def test_gpt_at_base_depth_is_mup_bit_for_bit(backend):
    """depth == base_depth: completep's model computes what mup's always did (m_L^-α = 1 exactly,
    nothing folded), on each path."""
    x, y = tokens()
    cp, _ = built(gpt_cfg("completep", depth=3, base_depth=3, bias=True))
    mu, _ = built(gpt_cfg("mup", depth=3, base_depth=3, bias=True))
    assert all(m.branch == 1.0 for m in cp.modules() if isinstance(m, MuLinear))
    a, ga = loss_and_grads(cp, x, y, backend)
    b, gb = loss_and_grads(mu, x, y, backend)
    assert torch.equal(a, b) and all(torch.equal(ga[n], gb[n]) for n in gb)


def test_gpt_modules_carry_the_tables_multipliers():
    """The table's forward_mult is the µP multiplier every layer's `mult` holds; branch_mult is
    the branch multiplier, carried by the last layer of each branch (attn.o, mlp.proj) alone."""
    model, table = built(gpt_cfg(depth=4, base_depth=2))
    ends = re.compile(r"blocks\.\d+\.(attn\.o|mlp\.proj)$")
    for name, mod in model.named_modules():
        if isinstance(mod, MuLinear):
            info = table[f"{name}.weight"]
            assert mod.mult == info.forward_mult, name
            assert mod.branch == (info.branch_mult if ends.match(name) else 1.0), name
    assert table["blocks.3.attn.o.weight"].branch_mult == 0.5 and table["blocks.0.mlp.proj.weight"].forward_mult == 1.0


# --------------------------------------------------------------------------- ResNet

def resnet_cfg(kind="completep", depth=2, base_depth=1):
    c = Config()
    c.model.arch, c.model.width, c.model.depth, c.model.act = "resnet", 4, depth, "relu"
    c.param.kind, c.param.base_depth, c.param.base_width, c.param.zero_readout = kind, base_depth, 4, False
    return c


RESNET_IO = SimpleNamespace(kind="classes", in_shape=(3, 6, 6), num_classes=5)


def test_resnet_branch_is_scaled_before_the_add_and_the_shortcut_is_not():
    model, table = built(resnet_cfg(depth=2, base_depth=1), RESNET_IO)
    beta = 2.0 ** -1.0
    ref = by_the_rule(model, RESNET_ENDS, beta)  # BasicBlock: relu(shortcut + β · bn2(...))
    x = torch.randn(4, *RESNET_IO.in_shape, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3])
    want_loss, want = loss_and_grads(ref, x, y)
    loss, got = loss_and_grads(model, x, y)
    unscaled, _ = loss_and_grads(by_the_rule(model, RESNET_ENDS, 1.0), x, y)
    assert abs(unscaled - want_loss) > 1e-4
    assert abs(loss - want_loss) <= 1e-6 * abs(want_loss) and max_rel(got, want) <= 1e-5
    # on a branch: exactly the branch's convolutions and norms, never a shortcut's or the stem's
    on = {n for n, info in table.items() if info.branch_mult != 1.0}
    assert on == {n for n in table if re.fullmatch(r"stages\.\d\.\d\.(conv1|bn1|conv2|bn2)\.(weight|bias)", n)}
    assert {table[n].branch_mult for n in on} == {beta} and len(on) == 4 * 2 * 6  # 4 stages x 2 blocks x 6
    assert any(".short." in n for n in table) and table["stem.weight"].branch_mult == 1.0


# --------------------------------------------------------------------------- MLP: refused

@pytest.mark.parametrize("kind", ["completep", "depth_mup"])
def test_depth_kinds_refuse_the_mlp_in_one_line(kind):
    cfg = Config()
    cfg.model.arch, cfg.param.kind = "mlp", kind
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "\n" not in str(e.value) and "model.arch=mlp" in str(e.value) and kind in str(e.value)
    cfg.model.arch = "resnet"
    validate(cfg)  # resnet has residual blocks


# --------------------------------------------------------------------------- stacked seeds

COMPLETEP_GPT = ["param.kind=completep", "model.depth=4", "param.base_depth=2"]


def test_stacked_gpt_folds_the_branch_as_each_member():
    """The stacked forward (models/stacked.py) of two seeds at depth 4 over base depth 2, biases
    on: each member's loss and gradients as its own forward gives them."""
    models = [built(gpt_cfg(depth=4, base_depth=2, bias=True), seed=s)[0] for s in (0, 1)]
    assert models[0].blocks[0].attn.o.branch == 0.5
    x, y = tokens()
    want = [loss_and_grads(m, x, y) for m in models]
    stack = Stack(models)
    losses = stack.losses(x, y)
    losses.sum().backward()
    stack.grads_to_members()
    for i, (m, (want_loss, want_grads)) in enumerate(zip(models, want)):
        assert abs(losses[i].item() - want_loss.item()) <= 1e-6 * abs(want_loss.item())
        assert max_rel({n: p.grad for n, p in m.named_parameters()}, want_grads) <= 1e-5


@pytest.mark.slow
def test_completep_sweep_stacked_equals_unstacked(tmp_path):
    """2 seeds at depth 4 (base depth 2), 20 Adam steps: losses within 1e-6, parameters within
    1e-6 of each tensor's largest entry (above 1)."""
    common = [*COMPLETEP_GPT, "train.steps=20", "sweep.seeds=[0,1]", "param.zero_readout=false"]
    off = run(cfg_of(tmp_path, TINY_GPT, *common, "sweep.stack=false", out="off"))
    on = run(cfg_of(tmp_path, TINY_GPT, *common, "sweep.stack=true", out="on"))
    _assert_runs_match(off, on, 1e-6, 1e-6)


# --------------------------------------------------------------------------- HF export

def test_llama_state_dict_folds_the_branch_into_o_proj_and_down_proj():
    from fastwidth.interop.hf import llama_state_dict
    cfg = gpt_cfg(depth=4, base_depth=2)
    cfg.model.norm, cfg.model.act, cfg.model.bias = "rms", "swiglu", True
    model, table = built(cfg)
    sd = llama_state_dict(model)
    beta = (4 / 2) ** -1.0  # completep's m_L^-α: on the weight and the bias alike
    for i in range(4):
        for ours, hf in (("attn.o", "self_attn.o_proj"), ("mlp.proj", "mlp.down_proj")):
            mod, info = model.get_submodule(f"blocks.{i}.{ours}"), table[f"blocks.{i}.{ours}.weight"]
            assert info.branch_mult == beta
            torch.testing.assert_close(sd[f"model.layers.{i}.{hf}.weight"], mod.weight * info.forward_mult * beta)
            torch.testing.assert_close(sd[f"model.layers.{i}.{hf}.bias"], mod.bias * beta)
        up = model.get_submodule(f"blocks.{i}.mlp.fc")  # not a branch's last layer: unscaled
        torch.testing.assert_close(sd[f"model.layers.{i}.mlp.up_proj.weight"], up.weight * up.mult)


@pytest.mark.slow  # trains (several s)
def test_completep_hf_export_gives_the_same_logits_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="pip install 'fastwidth[hf]'")
    import fastwidth
    from fastwidth.cli import main
    from tests.test_interop import LLAMA_GPT
    spec = {**LLAMA_GPT, "model": {**LLAMA_GPT["model"], "depth": 4},
            "param": {**LLAMA_GPT["param"], "kind": "completep", "base_depth": 2}}
    run_dir = fastwidth.train(spec, train__out_dir=str(tmp_path / "run"), data__cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--format", "hf", "--member", "w32_s0", "-o", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ours = fastwidth.load_model(run_dir, "w32_s0")
    assert ours.blocks[0].attn.o.branch == 0.5
    x = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
        for blk in ours.blocks:  # the same weights without the multiplier: other logits
            blk.attn.o.branch = blk.mlp.proj.branch = 1.0
        unscaled = ours(x)
    diff = (a - b).abs().max().item()
    print(f"\ncompletep depth 4 HF export: max |logit diff| {diff:.3g} (logits up to {a.abs().max().item():.3g}, "
          f"{(a - unscaled).abs().max().item():.3g} from the unscaled model's)")
    assert (a - unscaled).abs().max() > 1e-3 and diff < 1e-5
