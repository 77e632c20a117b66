"""A fastwidth GPT as a Hugging Face Llama checkpoint that `transformers` loads as it is.

The GPT with RMSNorm, SwiGLU and RoPE is a Llama: pre-norm blocks, gated MLP (silu(gate)·up),
rotary embeddings on the two halves of each head (rotate_half), untied readout. What fastwidth
keeps outside the weights is folded into them:
    - every layer's forward multiplier (µP: the readout's output_mult / m; 1 for the others) ×
      its weight (biases are not multiplied, as in MuLinear);
    - the depth kinds' residual branch multiplier m_L^-α (MuLinear.branch of attn.o and mlp.proj)
      × o_proj's and down_proj's weights and biases (it scales a branch's whole output);
    - the attention scale: fastwidth uses attn_mult / head_dim, Llama 1/√head_dim, so the query
      weight (and bias) carry the ratio √head_dim · scale (RoPE is linear, so scaling q before
      it is the same as scaling the logits).
Grouped-query heads (model.n_kv_heads) are Llama's num_key_value_heads. Tied embeddings
(model.tie_embeddings) are tie_word_embeddings: the one matrix is the embedding (× its multiplier),
and the readout's multiplier, which fastwidth applies to the output use only, is folded into the
final RMSNorm's gain (exact: the readout is linear in the normalized features). QK-norm
(model.qk_norm) exports as a Qwen3 (a Llama with q_norm / k_norm over head_dim, one gain shared
by the heads, before RoPE, as fastwidth's): the attention scale then rides on the q_norm gain,
since q's projection is normalized away.
Other layouts (LayerNorm, GELU MLPs, MLPs, ResNets; biases with QK-norm) are refused in one line.

A model.arch=hf run is already a transformers model with transformers' names: its state dict is
written with the same folds (family_state_dict), for Llama, Qwen2 and GPT-NeoX: forward
multipliers × their matrices, the branch multiplier × the branch outputs' weights and biases, and
each layer's attention scale over transformers' 1/√head_dim × the query rows (weights and biases;
GPT-NeoX's fused query_key_value holds them per head as [q | k | v]).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from fastwidth.config import gpt_heads
from fastwidth.errors import UserError
from fastwidth.nn import TiedReadout
from fastwidth.run import RunDir


def check_llama_layout(cfg) -> None:
    mc = cfg.model
    if mc.arch != "gpt":
        raise UserError(f"export --format hf takes a GPT run (a Llama layout) or a model.arch=hf run; this run has "
                        f"model.arch={mc.arch}")
    bad = [f"model.{k}={getattr(mc, k)}" for k, want in (("norm", "rms"), ("act", "swiglu")) if getattr(mc, k) != want]
    if bad:
        raise UserError(f"export --format hf needs model.norm=rms and model.act=swiglu (a Llama layout); "
                        f"this run has {', '.join(bad)}")
    if mc.qk_norm and mc.bias:
        raise UserError("export --format hf of model.qk_norm=true writes a Qwen3, whose MLP has no biases; "
                        "this run has model.bias=true")


def hf_model_classes(cfg):
    """(config class, model class) of the transformers architecture the GPT exports as: Qwen3 with
    QK-norm, else Llama; one line when transformers (or its Qwen3) is missing."""
    try:
        import transformers
    except ImportError:
        raise UserError("export --format hf needs transformers: pip install 'fastwidth[hf]'") from None
    if not cfg.model.qk_norm:
        return transformers.LlamaConfig, transformers.LlamaForCausalLM
    if not hasattr(transformers, "Qwen3ForCausalLM"):
        raise UserError(f"export --format hf of model.qk_norm=true writes a Qwen3, which transformers "
                        f"{transformers.__version__} lacks (Qwen3 is in 4.51 and later)")
    return transformers.Qwen3Config, transformers.Qwen3ForCausalLM


def llama_config_kwargs(cfg, vocab_size: int) -> dict:
    mc = cfg.model
    n_heads, n_kv_heads = gpt_heads(mc, mc.width, cfg.param.base_width)
    kw = dict(vocab_size=vocab_size, hidden_size=mc.width, intermediate_size=mc.mlp_ratio * mc.width,
              num_hidden_layers=mc.depth, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
              head_dim=mc.width // n_heads, hidden_act="silu", max_position_embeddings=cfg.data.seq_len,
              rms_norm_eps=1e-6, rope_theta=float(mc.rope_base), attention_bias=mc.bias,
              tie_word_embeddings=mc.tie_embeddings, bos_token_id=None, eos_token_id=None, torch_dtype="float32")
    if not mc.qk_norm:
        kw["mlp_bias"] = mc.bias  # Llama's; Qwen3's MLP has no bias (refused above)
    return kw


def llama_state_dict(model) -> dict[str, torch.Tensor]:
    """The Llama state dict of a fastwidth GPT module, multipliers and attention scale folded in."""
    def lin(mod, prefix: str, factor: float = 1.0) -> dict:
        factor = factor * mod.branch  # o_proj, down_proj under the depth kinds: m_L^-α, bias included
        out = {f"{prefix}.weight": mod.weight.detach().float() * (mod.mult * factor)}
        if mod.bias is not None:
            out[f"{prefix}.bias"] = mod.bias.detach().float() * factor
        return out

    tied = isinstance(model.readout, TiedReadout)
    embed = model.embed.weight.detach().float() * model.embed.mult
    # tied: one matrix, so the readout's multiplier (relative to the embedding's) goes on the final gain
    gain = model.readout.mult / model.embed.mult if tied else 1.0
    sd = {"model.embed_tokens.weight": embed, "model.norm.weight": model.norm_f.weight.detach().float() * gain}
    for i, b in enumerate(model.blocks):
        p, a = f"model.layers.{i}", b.attn
        q_factor = math.sqrt(a.head_dim) * a.scale  # Llama scales logits by 1/√head_dim
        sd.update({f"{p}.input_layernorm.weight": b.norm1.weight.detach().float(),
                   f"{p}.post_attention_layernorm.weight": b.norm2.weight.detach().float(),
                   **lin(a.k, f"{p}.self_attn.k_proj"), **lin(a.v, f"{p}.self_attn.v_proj"),
                   **lin(a.o, f"{p}.self_attn.o_proj"), **lin(b.mlp.gate, f"{p}.mlp.gate_proj"),
                   **lin(b.mlp.fc, f"{p}.mlp.up_proj"), **lin(b.mlp.proj, f"{p}.mlp.down_proj")})
        if a.q_norm is None:
            sd.update(lin(a.q, f"{p}.self_attn.q_proj", q_factor))
        else:  # q is RMS-normalized after its projection: the scale rides on the q_norm gain
            sd.update({**lin(a.q, f"{p}.self_attn.q_proj"),
                       f"{p}.self_attn.q_norm.weight": a.q_norm.weight.detach().float() * q_factor,
                       f"{p}.self_attn.k_norm.weight": a.k_norm.weight.detach().float()})
    sd.update({"lm_head.weight": embed} if tied else lin(model.readout, "lm_head"))
    return {k: v.contiguous() for k, v in sd.items()}


def family_state_dict(model) -> dict[str, torch.Tensor]:
    """The transformers state dict of a model.arch=hf model (a loaded member: its .config and
    .mup_table), every multiplier fastwidth applies outside the weights folded in."""
    from fastwidth.models.hf_families import FAMILIES, attention_modules
    from fastwidth.param.scaling import module_mults
    fam = FAMILIES[model.config.model.hf["model_type"]]
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    mults, branch = module_mults(model.mup_table)
    for name, mult in mults.items():
        sd[f"{name}.weight"] *= mult  # W(αx) + b = (αW)x + b
    for name in (model.branch_output_names if branch != 1.0 else ()):
        for key in (f"{name}.weight", f"{name}.bias"):
            if key in sd:
                sd[key] *= branch
    for i, attn in enumerate(attention_modules(model.inner, fam)):
        head_dim = getattr(attn, "head_dim", None) or attn.head_size
        q_factor = attn.scaling * math.sqrt(head_dim)  # transformers scales the logits by 1/√head_dim
        for key in (f"{fam.layers}.{i}.{fam.query}.weight", f"{fam.layers}.{i}.{fam.query}.bias"):
            if key not in sd:
                continue
            if fam.fused_qkv:  # rows per head: [q | k | v], head_dim each
                rows = sd[key].view(-1, 3, head_dim, *sd[key].shape[1:])
                rows[:, 0] *= q_factor
            else:
                sd[key] *= q_factor
    return {k: v.contiguous() for k, v in sd.items()}


def _load_exactly(hf, sd: dict[str, torch.Tensor]) -> None:
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"{type(hf).__name__} state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")


def export_hf(run_dir: Path, member: str, out: Path, trust_checkpoint: bool = False) -> Path:
    """Write `member` of `run_dir` as a Hugging Face checkpoint in directory `out`: a GPT run as a
    Llama (or Qwen3), a model.arch=hf run as its own family."""
    from fastwidth.trainer.load import load_model
    from fastwidth.config import from_dict, read_yaml
    cfg = from_dict(read_yaml(RunDir(run_dir).config))
    if cfg.model.arch == "hf":
        from fastwidth.models.hf_families import transformers_module
        transformers = transformers_module()
        model = load_model(run_dir, member, trust_checkpoint=trust_checkpoint)
        hf = transformers.AutoModelForCausalLM.from_config(model.inner.config)
        _load_exactly(hf, family_state_dict(model))
    else:
        check_llama_layout(cfg)
        config_cls, model_cls = hf_model_classes(cfg)
        model = load_model(run_dir, member, trust_checkpoint=trust_checkpoint)
        sd = llama_state_dict(model)
        hf = model_cls(config_cls(**llama_config_kwargs(model.config, int(sd["lm_head.weight"].shape[0]))))
        _load_exactly(hf, sd)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out
