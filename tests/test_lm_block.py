"""The LM block of 2026 (issue 30 item 5): grouped-query attention, QK-norm, tied embeddings and the
z-loss, each checked against a reference written from its rule (not from fastwidth's code).

    GQA       query head h reads kv head h // G, G = heads / kv heads kept at every width
    QK-norm   q, k ← g ⊙ x / √(mean_d x² + ε) over head_dim, one gain for q and one for k, before RoPE
    tied      logits = (output_mult / m) · h Eᵀ with E the embedding; one parameter, the embedding's row
    z-loss    loss = CE + z · mean over targets of logsumexp(logits)²
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fastwidth.config import gpt_heads, load_config, resolve
from fastwidth.errors import ConfigError
from fastwidth.kernels import attention as A
from fastwidth.kernels import dispatch
from fastwidth.models import build_model
from fastwidth.nn import TiedReadout
from fastwidth.param.optim import build_optimizer
from tests.kernels.helpers import compare

IO = SimpleNamespace(kind="tokens", vocab_size=61, seq_len=16)
ALL = ["model.qk_norm=true", "model.n_kv_heads=1", "model.tie_embeddings=true", "train.z_loss=1e-3"]


def gpt_cfg(*sets):
    # head_dim 8, base width 16: 2 query heads at the base width
    return load_config(None, ["model.arch=gpt", "model.depth=2", "model.head_dim=8", "param.base_width=16",
                              "data.seq_len=16", "param.zero_readout=false", *sets])


def randomize_gains(model, seed=0):
    """Norm gains away from their init of ones, so a misplaced gain shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.5 * torch.rand(p.shape, generator=g))


# --------------------------------------------------------------------------- grouped-query heads

def test_kv_heads_keep_the_group_size_of_the_base_width():
    m = gpt_cfg("model.n_kv_heads=1").model  # base 2 heads, 1 kv head: group 2
    assert [gpt_heads(m, w, 16) for w in (16, 32, 64, 96)] == [(2, 1), (4, 2), (8, 4), (12, 6)]
    fixed = gpt_cfg("model.n_heads=4", "model.n_kv_heads=2").model  # fixed heads: fixed kv heads
    assert [gpt_heads(fixed, w, 16) for w in (16, 64)] == [(4, 2), (4, 2)]
    assert gpt_heads(gpt_cfg().model, 64, 16) == (8, 8)  # 0: no grouping
    with pytest.raises(ConfigError, match=r"width 24 has 3 query heads, not a multiple of the group size 2"):
        resolve(gpt_cfg("model.n_kv_heads=1", "sweep.widths=[16,24]"))
    with pytest.raises(ConfigError, match=r"model.n_kv_heads=3 .* must divide the 2 query heads"):
        resolve(gpt_cfg("model.n_kv_heads=3"))


def test_gqa_model_projects_k_and_v_to_the_kv_heads_as_hidden_matrices():
    _, t = build_model(gpt_cfg("model.width=64", "model.n_kv_heads=1"), IO)  # 8 heads, 4 kv heads of 8
    assert t["blocks.0.attn.k.weight"].shape == t["blocks.0.attn.v.weight"].shape == (32, 64)
    assert t["blocks.0.attn.q.weight"].shape == (64, 64)
    k, q = t["blocks.0.attn.k.weight"], t["blocks.0.attn.q.weight"]
    assert k.role == "hidden" and (k.lr_mult, k.init_std) == (q.lr_mult, 1.0 / math.sqrt(64))


def _attention_by_the_rules(attn, x, cos, sin):
    """Attention written out from the rules: separate projections, per-head RMS over head_dim times
    the shared gain, RoPE on halves, each query head against kv head h // G, softmax(scale q·k)."""
    B, T, C = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (x @ attn.q.weight.t()).view(B, T, H, D)
    k = (x @ attn.k.weight.t()).view(B, T, Hkv, D)
    v = (x @ attn.v.weight.t()).view(B, T, Hkv, D)
    if attn.q_norm is not None:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.q_norm.weight
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.k_norm.weight
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))
    c, s = cos[:T], sin[:T]

    def rot(z):
        z1, z2 = z[..., :D // 2], z[..., D // 2:]
        return torch.cat([z1 * c - z2 * s, z1 * s + z2 * c], dim=-1)
    q, k = rot(q), rot(k)
    G = H // Hkv
    out = []
    for h in range(H):
        logits = (q[:, h] @ k[:, h // G].transpose(-1, -2)) * attn.scale
        logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        out.append(logits.softmax(-1) @ v[:, h // G])
    y = torch.stack(out, 1).transpose(1, 2).reshape(B, T, C)
    return y @ attn.o.weight.t()


@pytest.mark.parametrize("extra", [["model.n_kv_heads=1"], ["model.qk_norm=true"],
                                   ["model.qk_norm=true", "model.n_kv_heads=2", "model.n_heads=4"]])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])  # 8-13 s interpreted
def test_attention_block_follows_the_rules(extra, backend):
    # width 96, head_dim 16 (the Triton kernel's least), base width 32 (2 heads): 6 heads on 3 kv
    # heads, or 6 ungrouped heads with QK-norm, or fixed 4 heads of 24 on 2 kv heads; T = 11.
    # Outputs and the gradients of the input and of every parameter
    model, _ = build_model(gpt_cfg("model.width=96", "model.head_dim=16", "param.base_width=32", *extra), IO)
    randomize_gains(model)
    attn = model.blocks[0].attn
    x = torch.randn(2, 11, 96, requires_grad=True)
    dy = torch.randn(2, 11, 96)
    params = [x, *attn.parameters()]
    with dispatch.using(backend):
        y = attn(x, model.rope_cos, model.rope_sin)
    got = torch.autograd.grad(y, params, dy)
    ref = _attention_by_the_rules(attn, x, model.rope_cos, model.rope_sin)
    want = torch.autograd.grad(ref, params, dy)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    for (n, _), a, b in zip([("x", x), *attn.named_parameters()], got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{n}: {m}")
    if "model.qk_norm=true" in extra:
        assert attn.q_norm.weight.shape == (attn.head_dim,)  # one gain shared by the heads


@pytest.mark.slow  # 1.4-1.7 s each interpreted; tests/kernels/test_kernel_attention.py keeps GQA at D=48 fast
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64])
def test_gqa_kernels_match_the_reference_at_odd_lengths(dtype, D):
    # Triton (interpreted) and SDPA against the explicit reference: 4 query heads on 2 kv heads,
    # T = 37 (a partial tile), causal; outputs, max logit and dq, dk, dv (dk, dv summed over the group)
    B, H, Hkv, T = 1, 4, 2, 37
    q, k, v, do = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, H, T, D)
    scale = 3.0 / D  # µP: attn_mult / head_dim

    def fn(backend):
        return lambda q, k, v: A.attention(q, k, v, scale=scale, causal=True, backend=backend, return_max_logit=True)
    for backend in ("triton", "torch"):
        compare(fn(backend), fn("math"), [q, k, v], [do, None], dtype, ["attention", "q", "k", "v"])


def test_qk_norm_gains_follow_the_width_role_of_head_dim():
    # fixed head_dim: the gain has no width dimension (µP FIXED: SGD LR × 1); fixed heads: head_dim
    # grows with width (vector-like: SGD LR × m); both init 1 and Adam LR × 1
    for sets, role, sgd_lr in ((["model.width=64"], "fixed", 1.0), (["model.width=64", "model.n_heads=2"], "vector", 4.0)):
        _, t = build_model(gpt_cfg(*sets, "model.qk_norm=true", "optim.name=sgd"), IO)
        for name in ("blocks.1.attn.q_norm.weight", "blocks.1.attn.k_norm.weight"):
            assert (t[name].role, t[name].init, t[name].lr_mult) == (role, "ones", sgd_lr), name
        _, t = build_model(gpt_cfg(*sets, "model.qk_norm=true"), IO)
        assert t["blocks.1.attn.q_norm.weight"].lr_mult == 1.0


# --------------------------------------------------------------------------- tied embeddings

@pytest.mark.parametrize("opt,lr_mult", [("adamw", 1.0), ("sgd", 4.0)])
def test_tied_matrix_is_one_parameter_with_the_embeddings_row(opt, lr_mult):
    cfg = gpt_cfg("model.width=64", "model.tie_embeddings=true", "param.output_mult=2.0", f"optim.name={opt}")
    model, t = build_model(cfg, IO)  # m = 64 / 16 = 4
    assert isinstance(model.readout, TiedReadout) and model.readout.weight is model.embed.weight
    names = [n for n, _ in model.named_parameters()]
    assert "embed.weight" in names and not any(n.startswith("readout") for n in names)
    assert not any(k.startswith("readout") for k in t) and "readout.weight" not in model.state_dict()
    row = t["embed.weight"]  # init N(0, embed_std²), LR vector-like (mup: MuAdam × 1, MuSGD × m)
    assert (row.role, row.init, row.init_std, row.lr_mult) == ("input", "normal", cfg.param.embed_std, lr_mult)
    assert model.readout.mult == 2.0 / 4 and model.embed.mult == 1.0  # output_mult / m on the output use only
    opt_ = build_optimizer(model, t, cfg)
    assert sum(len(g["params"]) for g in opt_.param_groups) == len(names)


def test_tied_logits_and_gradient_are_the_two_uses_of_one_matrix():
    model, _ = build_model(gpt_cfg("model.width=32", "model.tie_embeddings=true"), IO)
    randomize_gains(model)
    x = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    E = model.embed.weight
    h = model.features(x)
    torch.testing.assert_close(model(x), (h @ E.t()) * (1.0 / 2), rtol=1e-5, atol=1e-6)  # m = 2
    # the tied gradient = the embedding use's + the readout use's (an untied copy of each)
    loss = model.loss(x, x)
    (g,) = torch.autograd.grad(loss, [E])
    E_in = E.detach().clone().requires_grad_(True)
    E_out = E.detach().clone().requires_grad_(True)
    model.embed.weight = torch.nn.Parameter(E_in)  # the same model with the two uses separated
    h2 = model.features(x)
    ref = F.cross_entropy(((h2 @ E_out.t()) * 0.5).reshape(-1, 61), x.reshape(-1))
    g_in, g_out = torch.autograd.grad(ref, [model.embed.weight, E_out])
    torch.testing.assert_close(g, g_in + g_out, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- z-loss

def _ce_with_z_loss(logits, y, z):
    logits = logits.double()
    return F.cross_entropy(logits, y) + z * torch.logsumexp(logits, -1).pow(2).mean()


def test_z_loss_adds_the_mean_squared_logsumexp_to_the_models_loss():
    z = 1e-2
    model, _ = build_model(gpt_cfg("model.width=32", f"train.z_loss={z}"), IO)
    assert model.z_loss == z
    x = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(2))
    params = list(model.parameters())
    loss = model.loss(x, x)
    got = torch.autograd.grad(loss, params)
    logits = model(x).reshape(-1, 61)
    ref = _ce_with_z_loss(logits, x.reshape(-1), z)
    want = torch.autograd.grad(ref, params)
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    assert ref.item() > F.cross_entropy(logits, x.reshape(-1)).item() + 1e-3  # the z term is there
    for (n, _), a, b in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6, msg=lambda m: f"d{n}: {m}")


def _native_backend():
    from fastwidth.kernels import native
    return ["native"] if native.available() else []


# triton interpreted: 1.6 s, slow tier (tests/kernels/test_kernel_readout_ce.py checks its z-loss in the fast one)
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow), *_native_backend()])
def test_z_loss_through_each_fused_readout_path(backend):
    # the op model.loss calls, on each path, against CE + z·mean(lse²) of explicit logits: 37 rows, 61
    # classes (odd), the µP multiplier, outputs and the gradients of h and W
    from fastwidth.kernels.readout_ce import readout_cross_entropy
    z, mult = 3e-2, 0.37
    h, W = torch.randn(37, 24, requires_grad=True), torch.randn(61, 24, requires_grad=True)
    y = torch.randint(0, 61, (37,), generator=torch.Generator().manual_seed(3))
    loss = readout_cross_entropy(h, W, y, multiplier=mult, z_loss=z, backend=backend)
    ref = _ce_with_z_loss((h @ W.t()) * mult, y, z)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    for a, b in zip(torch.autograd.grad(loss, [h, W]), torch.autograd.grad(ref, [h, W])):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("sets,msg", [
    (["model.arch=mlp", "data.source=synthetic", "model.tie_embeddings=true"], "model.tie_embeddings=True: .* are for gpt"),
    (["train.z_loss=0.1", "train.loss=mse"], "train.z_loss=0.1 .* train.loss=mse has none"),
])
def test_options_that_cannot_apply_are_refused_in_one_line(sets, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        resolve(gpt_cfg(*sets))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- stacked seeds

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stack_with_every_option_equals_each_member(precision):
    # two seeds of one width (4 heads on 2 kv heads, QK-norm, tied, z-loss) as one Stack: each
    # member's loss and every gradient (the tied matrix's from both of its uses) as trained alone
    from fastwidth.models.stacked import Stack, refusal
    from fastwidth.trainer.loop import autocast_for
    cfg = gpt_cfg("model.width=32", f"train.precision={precision}", *ALL)
    assert refusal(cfg) is None
    models = [build_model(cfg, IO, seed=seed)[0] for seed in (0, 1)]
    x = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(5))
    want = []
    for seed, model in enumerate(models):
        randomize_gains(model, seed=seed)
        with autocast_for(cfg, torch.device("cpu")):
            loss = model.loss(x, y)
        loss.backward()
        want.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    stack = Stack(models)
    with autocast_for(cfg, torch.device("cpu")):
        losses = stack.losses(x, y)
    losses.sum().backward()
    stack.grads_to_members()
    # bf16: the members' own rounding, in the worst gradient relative to its largest entry: 1.95e-2
    # for the plain block here (gains randomized), 3.1e-2 with GQA + QK-norm (q, k rounded to bf16
    # once more, after the norm), 4.1e-2 with every option; fp32 checks the logic at 1e-5
    tol = 1e-5 if precision == "fp32" else 5e-2
    for i, model in enumerate(models):
        torch.testing.assert_close(losses[i].detach().float(), want[i][0].float(), rtol=tol, atol=tol)
        for n, p in model.named_parameters():
            g = want[i][1][n]
            assert (p.grad - g).abs().max() <= tol * g.abs().max().clamp_min(1e-12), n


# --------------------------------------------------------------------------- Hugging Face export

@pytest.mark.slow  # importing transformers takes 4-10 s on 2 loaded cores
@pytest.mark.parametrize("extra,arch", [(["model.n_kv_heads=1", "model.tie_embeddings=true"], "LlamaForCausalLM"),
                                        (ALL, "Qwen3ForCausalLM")])
def test_hf_export_of_the_lm_block_gives_the_same_logits(extra, arch, tmp_path):
    # GQA as num_key_value_heads, tied as tie_word_embeddings (the readout's 1/m on the final norm's
    # gain), QK-norm as a Qwen3 (the attention scale on q_norm's gain); saved and loaded as it is
    transformers = pytest.importorskip("transformers", reason="pip install 'fastwidth[hf]'")
    from fastwidth.interop.hf import hf_model_classes, llama_config_kwargs, llama_state_dict
    cfg = gpt_cfg("model.width=64", "model.head_dim=16", "param.base_width=32", "model.act=swiglu",
                  "param.attn_mult=3.0", *extra)  # 4 heads on 2 kv heads, m = 2
    model, _ = build_model(cfg, IO)
    randomize_gains(model)
    config_cls, model_cls = hf_model_classes(cfg)
    hf = model_cls(config_cls(**llama_config_kwargs(cfg, 61)))
    missing, unexpected = hf.load_state_dict(llama_state_dict(model), strict=False)
    assert not unexpected and not [k for k in missing if "rotary_emb" not in k], (missing, unexpected)
    hf.save_pretrained(str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(hf).__name__ == arch
    assert hf.config.num_key_value_heads == 2 and hf.config.tie_word_embeddings == cfg.model.tie_embeddings
    x = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = model(x), hf(x).logits
    assert a.abs().max() > 0.1 and (a - b).abs().max() < 1e-5, (a - b).abs().max()


def test_flops_count_the_tied_readout_and_the_smaller_kv_projections():
    # per token, forward: 2·(in·out) per linear + 4·T·width per attention; × 3 for training
    from fastwidth.trainer.flops import flops_per_token
    io = SimpleNamespace(kind="tokens", vocab_size=61, seq_len=16)
    N, T, V = 32, 16, 61
    for sets, kv in (([], N), (["model.n_kv_heads=1", "model.tie_embeddings=true"], N // 2)):
        cfg = gpt_cfg("model.width=32", *sets)
        block = 2 * (N * N * 2 + 2 * N * kv + 2 * 4 * N * N) + 4 * T * N  # q, o, k, v, MLP; q kᵀ and p v (unmasked)
        want = 3 * (2 * block + 2 * N * V)
        assert flops_per_token(cfg, io) == pytest.approx(want, rel=1e-12)
