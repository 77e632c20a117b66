"""fastwidth outside fastwidth: the Python API, Hugging Face export, microsoft/mup base shapes."""
import json

import pytest
import torch
import yaml

import fastwidth
from fastwidth.cli import main
from fastwidth.run.metrics import read_metrics

LLAMA_GPT = dict(model={"arch": "gpt", "depth": 2, "head_dim": 8, "act": "swiglu", "norm": "rms", "bias": True},
                 param={"base_width": 16, "attn_mult": 3.0, "zero_readout": False},  # a non-Llama attention scale
                 data={"source": "stdlib", "seq_len": 16, "batch_size": 4, "probe_size": 4},
                 sweep={"widths": [16, 32], "seeds": [0]}, stats={"every": 3},
                 train={"steps": 6, "progress": False, "report": False})


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    return fastwidth.train(LLAMA_GPT, train__out_dir=str(tmp / "run"), data__cache_dir=str(tmp / "cache"))


def test_train_and_load_run_from_python(gpt_run):
    run = fastwidth.load_run(gpt_run)
    assert run.config["model"]["act"] == "swiglu" and run.widths == [16, 32]
    assert {r["step"] for r in run.rows("train")} == {6}  # train.log_every=10: the last step only
    with pytest.raises(fastwidth.api.ConfigError, match="section__key"):
        fastwidth.make_config("demo", steps=5)
    cfg = fastwidth.make_config("demo", ["optim.lr=1e-2"], train__steps=7, sweep={"widths": [32, 64]})
    assert (cfg.train.steps, cfg.optim.lr, cfg.sweep.widths, cfg.name) == (7, 1e-2, [32, 64], "demo")


def test_load_model_is_the_trained_model(gpt_run):
    model = fastwidth.load_model(gpt_run, "w32_s0")
    assert isinstance(model, torch.nn.Module) and not model.training
    from safetensors.torch import load_file
    probe = load_file(str(gpt_run / "probe.safetensors"))
    with torch.no_grad():
        logits = model(probe["x"])  # (B, T, vocab)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), probe["y"].reshape(-1))
    final = [r for r in read_metrics(gpt_run / "metrics.jsonl") if r["kind"] == "eval" and r["width"] == 32
             and r["step"] == 6]
    assert logits.shape == (*probe["x"].shape, 256)
    assert loss.item() == pytest.approx(final[0]["probe_loss"], rel=1e-5)
    with pytest.raises(fastwidth.api.CheckpointError, match="has no model w64_s0"):
        fastwidth.load_model(gpt_run, "w64_s0")


@pytest.mark.slow  # a whole training run (several s): the second tier keeps the fast one under 5 minutes
def test_hf_export_gives_the_same_logits_in_transformers(gpt_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="pip install 'fastwidth[hf]'")
    out = tmp_path / "hf"
    assert main(["export", str(gpt_run), "--format", "hf", "--member", "w32_s0", "-o", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()  # as it is: no custom code
    assert type(hf).__name__ == "LlamaForCausalLM"
    ours = fastwidth.load_model(gpt_run, "w32_s0")
    x = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    diff = (a - b).abs().max().item()
    print(f"HF export: max |logit diff| {diff:.3g} (logits up to {a.abs().max().item():.3g})")
    assert a.abs().max() > 0.1 and diff < 1e-5


def test_hf_export_refuses_other_layouts_and_bad_outputs(gpt_run, tmp_path, capsys):
    cfg = yaml.safe_load((gpt_run / "config.yaml").read_text())
    gelu = tmp_path / "gelu"
    gelu.mkdir()
    (gelu / "checkpoints").mkdir()
    (gelu / "config.yaml").write_text(yaml.safe_dump({**cfg, "model": {**cfg["model"], "act": "gelu"}}))
    cases = [(["export", str(gelu), "--format", "hf", "--member", "w32_s0", "-o", str(tmp_path / "o")],
              "needs model.norm=rms and model.act=swiglu"),
             (["export", str(gpt_run), "--format", "hf", "-o", str(tmp_path / "o")], "--member"),
             (["export", str(gpt_run), "-o", str(tmp_path / "missing" / "w.safetensors")], "does not exist"),
             (["export", str(gpt_run), "--format", "hf", "--member", "w32_s0", "-o", str(tmp_path / "a" / "b")],
              "does not exist")]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gelu"]  # nothing written


@pytest.mark.parametrize("arch,opt", [("mlp", "adam"), ("mlp", "sgd"), ("gpt", "adam"),
                                      pytest.param("gpt", "sgd", marks=pytest.mark.slow)])
def test_multipliers_match_the_mup_package(tmp_path, capsys, arch, opt):
    mup = pytest.importorskip("mup", reason="pip install --no-deps mup (the Makefile does)")
    sets = ["param.base_width=16", "model.width=64", f"optim.name={opt}", "param.output_mult=2.0"]
    sets += (["model.arch=mlp", "data.source=synthetic", "data.in_dim=10"] if arch == "mlp" else
             ["model.arch=gpt", "model.head_dim=8", "model.act=swiglu", "model.bias=true", "data.seq_len=16",
              f"data.cache_dir={tmp_path / 'cache'}"])
    bsh = tmp_path / "base.bsh"
    assert main(["mup-table", "--bsh", str(bsh), "--set", *sets]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    from fastwidth.config import load_config
    from fastwidth.data import build_stream
    from fastwidth.models import build_model
    from fastwidth.trainer.loop import data_io
    cfg = load_config(None, sets)
    model, _ = build_model(cfg, data_io(build_stream(cfg.data), cfg))
    mup.set_base_shapes(model, str(bsh), rescale_params=False)  # mup reads fastwidth's file
    make = mup.MuAdam if opt == "adam" else mup.MuSGD
    groups = make(model.parameters(), lr=1.0, weight_decay=1.0).param_groups
    theirs = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert rows[name]["lr_mult"] == pytest.approx(theirs[id(p)][0]), name
        assert rows[name]["wd_mult"] == pytest.approx(theirs[id(p)][1]), name
    readout = model.readout.weight
    assert rows["readout.weight"]["forward_mult"] == pytest.approx(2.0 / readout.infshape.width_mult())
    assert len(rows) == len(dict(model.named_parameters()))
