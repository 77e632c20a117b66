"""model.arch hf: Hugging Face Llama / Qwen2 / GPT-NeoX at each width, µP by inference, the attention
scale through each layer's `scaling`, rotary buffers through meta -> to_empty, and the export's folds
(the exported transformers model's logits equal fastwidth's)."""
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from fastwidth.config import from_dict, validate
from fastwidth.errors import ConfigError
from fastwidth.models import build_model, hf_families

pytest.importorskip("transformers")

VOCAB, SEQ = 16, 8
IO = SimpleNamespace(kind="tokens", vocab_size=VOCAB, seq_len=SEQ)


def cfg_of(model_type="llama", width=64, **over):
    model = {"arch": "hf", "hf": {"model_type": model_type}, "width": width, "depth": 1, "head_dim": 8,
             **over.pop("model", {})}
    data = {"model": model, "param": {"base_width": 32, **over.pop("param", {})}, "data": {"seq_len": SEQ}}
    cfg = from_dict(data)
    validate(cfg)
    return cfg


def test_llama_mup_table_at_widths_32_and_64_by_hand():
    """Base 32, width 64 (m = 2), Adam µP: hidden matrices N(0, 1/fan_in) with LR 1/m; the token
    embedding an input (N(0, 1), LR 1); norms vectors of ones; lm_head the readout (zero, α/m)."""
    hidden = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for width, m in ((32, 1.0), (64, 2.0)):
        model, table = build_model(cfg_of(width=width), IO)
        for name in hidden:
            info = table[f"model.layers.0.{name}.weight"]
            fan_in = 4 * width if name == "mlp.down_proj" else width
            assert (info.role, info.init, info.lr_mult, info.forward_mult) == ("hidden", "normal", 1 / m, 1.0), name
            assert info.init_std == pytest.approx(1 / math.sqrt(fan_in)), name
        emb = table["model.embed_tokens.weight"]
        assert (emb.role, emb.init_std, emb.lr_mult) == ("input", 1.0, 1.0)
        for name in ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                     "model.norm.weight"):
            assert (table[name].role, table[name].init, table[name].lr_mult) == ("vector", "ones", 1.0)
        head = table["lm_head.weight"]
        assert (head.role, head.init, head.lr_mult, head.forward_mult) == ("output", "zeros", 1.0, 1 / m)
        assert len(table) == 12
        assert model.readout_name == "lm_head"


def test_rotary_buffers_survive_meta_to_empty():
    """Built on meta and materialized with to_empty, inv_freq is RoPE's 1/θ^(2i/d), not garbage."""
    model, _ = build_model(cfg_of(), IO)
    want = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    bufs = dict(model.named_buffers())
    torch.testing.assert_close(bufs["model.rotary_emb.inv_freq"], want)
    torch.testing.assert_close(bufs["model.rotary_emb.original_inv_freq"], want)


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_attention_scale_is_mup_and_is_read(model_type):
    """Every layer's `scaling` is attn_mult / head_dim (default √(base head_dim) / head_dim), and the
    forward reads it: changing it changes the logits."""
    cfg = cfg_of(model_type, model={"n_heads": 2, "depth": 2}, param={"zero_readout": False})
    model, _ = build_model(cfg, IO)   # n_heads 2: head_dim 16 at base 32, 32 at width 64
    attns = hf_families.attention_modules(model.inner, hf_families.family_of(cfg))
    assert [a.scaling for a in attns] == [pytest.approx(math.sqrt(16) / 32)] * 2
    x = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        before = model(x)
        for a in attns:
            a.scaling *= 3.0
        after = model(x)
    assert (after - before).abs().max() > 1e-3
    sdpa_cfg = cfg_of(model_type, model={"n_heads": 2, "depth": 2}, param={"zero_readout": False})
    sdpa_cfg.model.hf["attn_implementation"] = "sdpa"
    sdpa, _ = build_model(sdpa_cfg, IO)
    sdpa.load_state_dict(model.state_dict())
    for a in hf_families.attention_modules(sdpa.inner, hf_families.family_of(cfg)):
        a.scaling *= 3.0
    with torch.no_grad():
        assert (sdpa(x) - after).abs().max() < 1e-5  # sdpa reads `scaling` too, and agrees with eager


def test_grouped_query_heads_follow_n_kv_heads():
    """n_kv_heads=1 at base 32 with head_dim 8: 4 query heads on 1 kv head; width 64: 8 on 2."""
    model, table = build_model(cfg_of(model={"n_kv_heads": 1}), IO)
    assert model.inner.config.num_key_value_heads == 2
    assert table["model.layers.0.self_attn.k_proj.weight"].shape == (16, 64)
    assert table["model.layers.0.self_attn.k_proj.weight"].role == "hidden"


def _randomized(cfg):
    from fastwidth.param.scaling import apply_forward_mults, mup_table
    model, table = build_model(cfg, IO)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    model.mup_table, model.config = table, cfg
    return model.eval()


@pytest.mark.parametrize("model_type,kind", [("llama", "completep"), ("qwen2", "mup"), ("gpt_neox", "depth_mup")])
def test_exported_state_dict_gives_equal_logits(model_type, kind):
    """The folds (readout α/m, branch multiplier, attention scale over 1/√head_dim into the query
    rows) make a plain transformers model compute fastwidth's logits; without the folds it does not."""
    import transformers
    from fastwidth.interop.hf import family_state_dict
    cfg = cfg_of(model_type, model={"depth": 2}, param={"kind": kind, "base_depth": 1, "attn_mult": 3.0,
                                                        "output_mult": 2.0})
    model = _randomized(cfg)
    hf = transformers.AutoModelForCausalLM.from_config(model.inner.config).eval()
    x = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        want = model(x)
        hf.load_state_dict(model.state_dict(), strict=False)
        unfolded = hf(x).logits
        hf.load_state_dict(family_state_dict(model), strict=False)
        got = hf(x).logits
    assert (got - want).abs().max() < 1e-4
    assert (unfolded - want).abs().max() > 1e-2


@pytest.mark.parametrize("hf,msg", [
    ({}, "model.arch=hf needs model.hf.model_type: one of llama, qwen2, gpt_neox"),
    ({"model_type": "gpt2"}, "model.hf.model_type 'gpt2': valid Hugging Face families are llama, qwen2, gpt_neox"),
])
def test_config_refuses_a_missing_or_unknown_family(hf, msg):
    with pytest.raises(ConfigError, match=msg):
        validate(from_dict({"model": {"arch": "hf", "hf": hf}}))
    with pytest.raises(ConfigError, match="model.hf is for model.arch=hf"):
        validate(from_dict({"model": {"arch": "gpt", "hf": {"model_type": "llama"}}}))
    with pytest.raises(ConfigError, match="model.bias=True: model.arch=hf takes its layout from the transformers"):
        validate(from_dict({"model": {"arch": "hf", "hf": {"model_type": "llama"}, "bias": True}}))


@pytest.mark.parametrize("extra,msg", [
    ({"hidden_size": 99}, "model.hf.hidden_size contradicts the width keys"),
    ({"rope_thetaa": 1.0}, "model.hf.rope_thetaa is not a LlamaConfig field"),
    ({"attn_implementation": "flash"}, "attn_implementation 'flash': valid are eager, sdpa"),
])
def test_factory_refuses_contradicting_unknown_keys(extra, msg):
    cfg = cfg_of()
    cfg.model.hf.update(extra)
    with pytest.raises(ConfigError, match=msg):
        hf_families.make_factory(cfg, IO)(64, 1)
    with pytest.raises(ConfigError, match="GPT-NeoX has no grouped-query attention"):
        hf_families.make_factory(cfg_of("gpt_neox", model={"n_kv_heads": 1}), IO)(64, 1)


def test_without_transformers_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"model.arch=hf needs transformers: pip install 'fastwidth\[hf\]'"):
        hf_families.make_factory(cfg_of(), IO)


@pytest.mark.slow
def test_each_family_trains_and_exports_with_equal_logits(tmp_path):
    """Qwen2 and GPT-NeoX train 10 steps in one process (widths 32, 64); `export --format hf` of
    w64_s0 loads with from_pretrained and gives fastwidth's logits (max abs difference < 1e-4).
    The Llama's round trip is tests/parallel/test_hf_engines.py's, on its one-process run."""
    import fastwidth
    from fastwidth.run.metrics import read_metrics
    for model_type in ("qwen2", "gpt_neox"):
        run = fastwidth.train({
            "model": {"arch": "hf", "hf": {"model_type": model_type}, "depth": 2, "head_dim": 8},
            "param": {"base_width": 32, "zero_readout": False},
            "data": {"source": "stdlib", "seq_len": 16, "batch_size": 8, "probe_size": 8,
                     "cache_dir": str(tmp_path / "cache")},
            "sweep": {"widths": [32, 64], "seeds": [0]},
            "train": {"steps": 10, "progress": False, "log_every": 1, "report": False, "threads": 1,
                      "out_dir": str(tmp_path / model_type)},
            "stats": {"every": 5, "sharpness_iters": 0, "ntk_points": 0, "kernel_points": 8}})
        rows = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train" and r["width"] == 64]
        assert len(rows) == 10 and rows[-1]["loss"] < rows[0]["loss"], model_type
        diff = export_round_trip(run, tmp_path / f"{model_type}_hf", model_type)
        assert diff < 1e-4, model_type


def export_round_trip(run, out, label: str) -> float:
    """max |logit difference| between member w64_s0 of `run` and its `export --format hf` loaded
    by transformers' from_pretrained, on two random byte sequences."""
    import transformers
    from fastwidth.interop.export import export
    from fastwidth.trainer.load import load_model
    out, _ = export(run, out, fmt="hf", member="w64_s0")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    model = load_model(run, "w64_s0")
    assert type(hf).__name__ == type(model.inner).__name__
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    print(f"\n{label}: export round trip max |logit difference| = {diff:.2e}")
    return diff


def test_shipped_hf_llama_config_loads():
    """configs/hf_llama.yaml: a Llama width sweep 32-128 with 3 seeds (the bootstrap over seeds)."""
    from pathlib import Path
    from fastwidth.config import load_config
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "hf_llama.yaml")
    assert (cfg.model.arch, cfg.model.hf["model_type"]) == ("hf", "llama")
    assert (cfg.sweep.widths, cfg.sweep.seeds, cfg.param.kind) == ([32, 64, 128], [0, 1, 2], "mup")
