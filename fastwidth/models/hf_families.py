"""Hugging Face model families (model.arch hf): a transformers causal LM at each width, µP by inference.

    make = make_factory(cfg, io)     # make(width, depth) -> AutoModelForCausalLM.from_config(...)
    model = build(cfg, io)           # models.user.build(cfg, io, make): roles inferred as for any module

The config at a width: hidden size = width, intermediate = model.mlp_ratio × width, heads = width /
model.head_dim (or model.n_heads fixed), key/value heads as fastwidth.config.gpt_heads counts them,
layers = model.depth, vocabulary = the stream's, positions = data.seq_len, untied readout, no
dropout, no KV cache, eager attention (exact on CPU). Other model.hf keys pass through.

µP's attention scale attn_mult / head_dim (param.scaling.attention_scale) is set as each attention
module's `scaling`, the float transformers' attention functions multiply the logits by. The
residual branches (the depth kinds) are each layer's parameters; their outputs are the attention
and MLP output projections: both are given to the instance as branch_prefixes() /
branch_outputs(), which models.user reads.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastwidth.config import HF_MODEL_TYPES, Config, for_width, gpt_heads
from fastwidth.errors import ConfigError
from fastwidth.param.scaling import attention_scale


@dataclass(frozen=True)
class Family:
    layers: str                      # the ModuleList of decoder layers
    attention: str                   # the attention module inside a layer (it owns `scaling`)
    outputs: tuple[str, ...]         # the modules ending the residual branches, inside a layer
    query: str                       # the query projection inside a layer ("qkv" rows for fused NeoX)
    fused_qkv: bool = False          # NeoX: one matrix, per head [q | k | v] rows


FAMILIES = {
    "llama": Family("model.layers", "self_attn", ("self_attn.o_proj", "mlp.down_proj"), "self_attn.q_proj"),
    "qwen2": Family("model.layers", "self_attn", ("self_attn.o_proj", "mlp.down_proj"), "self_attn.q_proj"),
    "gpt_neox": Family("gpt_neox.layers", "attention", ("attention.dense", "mlp.dense_4h_to_h"),
                       "attention.query_key_value", fused_qkv=True),
}
assert set(FAMILIES) == set(HF_MODEL_TYPES)
# the keys the width keys set: model.hf may not name them
WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_hidden_layers", "vocab_size", "max_position_embeddings", "tie_word_embeddings")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.arch=hf needs transformers: pip install 'fastwidth[hf]'") from None
    return transformers


def family_of(cfg: Config) -> Family:
    mt = cfg.model.hf.get("model_type")
    if mt not in FAMILIES:
        raise ConfigError(f"model.hf.model_type {mt!r}: valid Hugging Face families are {', '.join(FAMILIES)}")
    return FAMILIES[mt]


def config_kwargs(cfg: Config, vocab_size: int, width: int, depth: int) -> dict:
    """The transformers config's keyword arguments at `width` and `depth`."""
    mc, hf = cfg.model, dict(cfg.model.hf)
    mt = hf.pop("model_type")
    hf.pop("attn_implementation", None)
    clash = [k for k in WIDTH_KEYS if k in hf]
    if clash:
        raise ConfigError(f"model.hf.{clash[0]} contradicts the width keys: fastwidth sets {', '.join(WIDTH_KEYS)} "
                          f"from model.width, mlp_ratio, head_dim / n_heads, n_kv_heads, depth, the data's vocabulary "
                          f"and data.seq_len")
    heads, kv_heads = gpt_heads(mc, width, cfg.param.base_width)
    kw = dict(hidden_size=width, intermediate_size=mc.mlp_ratio * width, num_attention_heads=heads,
              num_hidden_layers=depth, vocab_size=vocab_size, max_position_embeddings=cfg.data.seq_len,
              tie_word_embeddings=False, use_cache=False, attention_dropout=0.0)
    if mt == "gpt_neox":
        if mc.n_kv_heads:
            raise ConfigError("model.n_kv_heads: GPT-NeoX has no grouped-query attention (leave it 0)")
        kw["hidden_dropout"] = 0.0
    else:
        kw.update(num_key_value_heads=kv_heads, head_dim=width // heads)
    return {**kw, **hf}


def _check_known(transformers, mt: str, hf: dict) -> None:
    cls = transformers.AutoConfig.for_model(mt).__class__
    default = cls()
    unknown = [k for k in hf if k not in ("model_type", "attn_implementation") and not hasattr(default, k)]
    if unknown:
        raise ConfigError(f"model.hf.{unknown[0]} is not a {cls.__name__} field (see its documentation for the "
                          f"valid keys)")


def make_factory(cfg: Config, io):
    """make(width, depth) -> the family's causal LM at that width, its attention scale µP's."""
    transformers = transformers_module()
    fam = family_of(cfg)
    mt, hf = cfg.model.hf["model_type"], cfg.model.hf
    impl = hf.get("attn_implementation", "eager")
    if impl not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"model.hf.attn_implementation {impl!r}: valid are {', '.join(ATTN_IMPLEMENTATIONS)}")
    _check_known(transformers, mt, hf)

    def make(width: int, depth: int):
        config = transformers.AutoConfig.for_model(mt, **config_kwargs(cfg, io.vocab_size, width, depth))
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl)
        set_attention_scale(model, fam, attention_scale(for_width(cfg, width)))
        layers = [f"{fam.layers}.{i}" for i in range(depth)]
        model.branch_prefixes = lambda: (f"{fam.layers}.",)
        model.branch_outputs = lambda: tuple(f"{p}.{o}" for p in layers for o in fam.outputs)
        return model
    return make


def attention_modules(model, fam: Family) -> list:
    return [layer.get_submodule(fam.attention) for layer in model.get_submodule(fam.layers)]


def set_attention_scale(model, fam: Family, scale: float) -> None:
    """Every layer's attention logits × `scale` (transformers' attention functions read `scaling`)."""
    for attn in attention_modules(model, fam):
        if not hasattr(attn, "scaling"):
            raise ConfigError(f"{type(attn).__name__} has no `scaling` attribute: this transformers version's "
                              f"attention cannot take µP's attention scale")
        attn.scaling = float(scale)


def build(cfg: Config, io):
    from fastwidth.models import user
    return user.build(cfg, io, make_factory(cfg, io))
