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
Other layouts (LayerNorm, GELU MLPs, MLPs, ResNets) are refused in one line.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from fastwidth.errors import UserError
from fastwidth.run import RunDir


def check_llama_layout(cfg) -> None:
    mc = cfg.model
    if mc.arch != "gpt":
        raise UserError(f"export --format hf takes a GPT run (a Llama layout); this run has model.arch={mc.arch}")
    bad = [f"model.{k}={getattr(mc, k)}" for k, want in (("norm", "rms"), ("act", "swiglu")) if getattr(mc, k) != want]
    if bad:
        raise UserError(f"export --format hf needs model.norm=rms and model.act=swiglu (a Llama layout); "
                        f"this run has {', '.join(bad)}")


def llama_config_kwargs(cfg, vocab_size: int) -> dict:
    mc = cfg.model
    n_heads = mc.n_heads or mc.width // mc.head_dim
    return dict(vocab_size=vocab_size, hidden_size=mc.width, intermediate_size=mc.mlp_ratio * mc.width,
                num_hidden_layers=mc.depth, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                head_dim=mc.width // n_heads, hidden_act="silu", max_position_embeddings=cfg.data.seq_len,
                rms_norm_eps=1e-6, rope_theta=float(mc.rope_base), attention_bias=mc.bias, mlp_bias=mc.bias,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, torch_dtype="float32")


def llama_state_dict(model) -> dict[str, torch.Tensor]:
    """The Llama state dict of a fastwidth GPT module, multipliers and attention scale folded in."""
    def lin(mod, prefix: str, factor: float = 1.0) -> dict:
        factor = factor * mod.branch  # o_proj, down_proj under the depth kinds: m_L^-α, bias included
        out = {f"{prefix}.weight": mod.weight.detach().float() * (mod.mult * factor)}
        if mod.bias is not None:
            out[f"{prefix}.bias"] = mod.bias.detach().float() * factor
        return out

    sd = {"model.embed_tokens.weight": model.embed.weight.detach().float() * model.embed.mult,
          "model.norm.weight": model.norm_f.weight.detach().float()}
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}"
        q_factor = math.sqrt(b.attn.head_dim) * b.attn.scale  # Llama scales logits by 1/√head_dim
        sd.update({f"{p}.input_layernorm.weight": b.norm1.weight.detach().float(),
                   f"{p}.post_attention_layernorm.weight": b.norm2.weight.detach().float(),
                   **lin(b.attn.q, f"{p}.self_attn.q_proj", q_factor), **lin(b.attn.k, f"{p}.self_attn.k_proj"),
                   **lin(b.attn.v, f"{p}.self_attn.v_proj"), **lin(b.attn.o, f"{p}.self_attn.o_proj"),
                   **lin(b.mlp.gate, f"{p}.mlp.gate_proj"), **lin(b.mlp.fc, f"{p}.mlp.up_proj"),
                   **lin(b.mlp.proj, f"{p}.mlp.down_proj")})
    sd.update(lin(model.readout, "lm_head"))
    return {k: v.contiguous() for k, v in sd.items()}


def export_hf(run_dir: Path, member: str, out: Path, trust_checkpoint: bool = False) -> Path:
    """Write `member` of `run_dir` as a Hugging Face Llama checkpoint in directory `out`."""
    from fastwidth.trainer.load import load_model
    from fastwidth.config import from_dict, read_yaml
    check_llama_layout(from_dict(read_yaml(RunDir(run_dir).config)))
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise UserError("export --format hf needs transformers: pip install 'fastwidth[hf]'") from None
    model = load_model(run_dir, member, trust_checkpoint=trust_checkpoint)
    sd = llama_state_dict(model)
    hf_cfg = LlamaConfig(**llama_config_kwargs(model.config, int(sd["lm_head.weight"].shape[0])))
    hf = LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"Llama state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out
