"""fastwidth.Consistency in a loop that is not fastwidth's: a stand-in loop, the Hugging Face and
Lightning callbacks (each against a stand-in driver and, slow, inside a real tiny Trainer)."""
from __future__ import annotations

import importlib
import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

import fastwidth
from fastwidth.errors import UserError
from fastwidth.run import MemberSpec, RunDir
from fastwidth.run.metrics import read_metrics

D_IN, CLASSES = 6, 3


class MLP(nn.Module):
    """A user's family: width-w hidden layers in a ModuleList, a linear readout."""

    def __init__(self, width: int):
        super().__init__()
        self.inp = nn.Linear(D_IN, width)
        self.blocks = nn.ModuleList([nn.Sequential(nn.ReLU(), nn.Linear(width, width))])
        self.out = nn.Linear(width, CLASSES)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(torch.relu(h))


def family(widths=(16, 32), seeds=(0, 1)) -> dict:
    out = {}
    for w in widths:
        for s in seeds:
            torch.manual_seed(100 * w + s)
            out[f"m{w}_{s}"] = (MLP(w), w, s)
    return out


def batches(n_steps: int, batch: int = 16):
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(D_IN, CLASSES, generator=g)
    probe_x = torch.randn(40, D_IN, generator=g)
    train = [torch.randn(batch, D_IN, generator=g) for _ in range(n_steps)]
    return (probe_x, (probe_x @ teacher).argmax(-1)), [(x, (x @ teacher).argmax(-1)) for x in train]


def standin_loop(run_dir, steps=4, every=2, **kw) -> tuple[fastwidth.Consistency, dict]:
    """Every member on every batch, Adam; the loop the Consistency does not own."""
    models = family(**kw)
    probe, data = batches(steps)
    c = fastwidth.Consistency(models, probe, run_dir, steps=steps, every=every, stats={"bootstrap": 50})
    opts = {k: torch.optim.Adam(m.parameters(), 1e-2) for k, (m, _, _) in models.items()}
    c.evaluate(0)
    for step, (x, y) in enumerate(data, 1):
        losses = {}
        for k, (m, _, _) in models.items():
            with c.training(k):
                loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opts[k].step()
            opts[k].zero_grad()
            losses[k] = loss.item()
        c.after_step(step, (x, y), loss=losses)  # training() saw the forwards: the batch only counts targets
    return c, models


def test_standin_loop_writes_rows_signatures_and_summary(tmp_path):
    run = tmp_path / "run"
    c, models = standin_loop(run)
    probe_x, probe_y = c.probe["x"], c.probe["y"]
    rows = read_metrics(RunDir(run).metrics)
    sigs = RunDir(run).list_signatures()
    assert set(sigs) == {MemberSpec(w, None, s).name for _, w, s in models.values()}
    assert all(sorted(steps) == [0, 2, 4] for steps in sigs.values())
    # the planted answer: the true-class-logit RMSE of w16_s0 against w32_s0, from the models themselves
    with torch.no_grad():
        true = {k: m(probe_x).gather(1, probe_y[:, None]).squeeze(1) for k, (m, _, _) in models.items()}
    want = float((true["m16_0"] - true["m32_0"]).pow(2).mean().sqrt())
    row = next(r for r in rows if r["kind"] == "consistency" and r["step"] == 4 and r["width"] == 16 and r["seed"] == 0)
    assert row["ref_width"] == 32 and row["ref_seed"] == 0
    assert row["true_logit_rmse"] == pytest.approx(want, rel=1e-5)
    ens = [r for r in rows if r["kind"] == "ensemble" and r["step"] == 4]
    assert {r["width"] for r in ens} == {16, 32} and all(r["seed_variance"] > 0 for r in ens)
    assert [r["step"] for r in rows if r["kind"] == "fit"] == [0, 2, 4]
    assert len([r for r in rows if r["kind"] == "train"]) == 4 * len(models)
    cfg = yaml.safe_load(RunDir(run).config.read_text())
    assert cfg["param"]["kind"] == "sp"  # PyTorch's own init, as the report labels the run
    assert cfg["model"]["arch"] == "python" and cfg["sweep"]["widths"] == [16, 32] and cfg["sweep"]["seeds"] == [0, 1]
    # the report's reader and summary read it as a fastwidth run (the figures: the slow test)
    from fastwidth.report.reader import load_run
    from fastwidth.report.summary import write_summary
    c.close()
    (tmp_path / "rep").mkdir()
    text = write_summary([load_run(run)], {}, tmp_path / "rep").read_text()
    assert "late RMSE" in text and "V_N" in text


def test_training_context_sees_the_forward_and_a_batch_costs_one_forward(tmp_path):
    """Preactivation moments of the first layer: inside training() those of the step's own
    forward (weights before the step); from a batch, those of a forward after the step."""
    models = family(widths=(8, 16), seeds=(0,))
    probe, [(x, y)] = batches(1)
    c = fastwidth.Consistency(models, probe, tmp_path / "a", steps=2, every=1)
    m = models["m8_0"][0]
    opt = torch.optim.SGD(m.parameters(), 0.5)
    c.evaluate(0, "m8_0")  # the first evaluation sets the histograms' bins (as a fastwidth run's step 0)
    with c.training("m8_0"):
        loss = nn.functional.cross_entropy(m(x), y)
    before = m.inp(x).detach()
    loss.backward()
    opt.step()
    c.after_step(1, members="m8_0")
    after = m.inp(x).detach()
    c.after_step(2, (x, y), members="m8_0")
    rows = [r for r in read_metrics(RunDir(tmp_path / "a").metrics) if r["kind"] == "eval"]
    layers = {r["step"]: r["preact"] for r in rows if "preact" in r}  # step 0: no training batch yet
    got = {step: p["inp"] for step, p in layers.items()}
    assert got[1]["mean"] == pytest.approx(float(before.mean()), rel=1e-5)
    assert got[2]["mean"] == pytest.approx(float(after.mean()), rel=1e-5)
    assert not math.isclose(float(before.mean()), float(after.mean()), rel_tol=1e-3)  # the test can tell them apart
    assert set(layers[1]) == {"inp", "blocks.0.1"}  # hidden layer in, readout out (roles read from shapes)
    c.close()


def test_probe_from_a_data_section_is_the_streams_probe_split(tmp_path):
    from fastwidth.config import from_dict
    from fastwidth.data import build_stream
    section = {"source": "synthetic", "in_dim": D_IN, "num_classes": CLASSES, "probe_size": 20}
    c = fastwidth.Consistency(family(widths=(8,), seeds=(0,)), section, tmp_path / "a", steps=1)
    want = build_stream(from_dict({"data": section}).data).probe()
    assert torch.equal(c.probe["x"], want["x"]) and torch.equal(c.probe["y"], want["y"])
    c.evaluate(0)
    c.close()
    assert yaml.safe_load(RunDir(tmp_path / "a").config.read_text())["data"]["source"] == "synthetic"


def test_one_line_errors(tmp_path):
    models = family(widths=(8,), seeds=(0,))
    probe, _ = batches(1)
    with pytest.raises(UserError, match="both width 8, seed 0"):
        fastwidth.Consistency({**models, "again": (MLP(8), 8, 0)}, probe, tmp_path / "a")
    with pytest.raises(UserError, match="reference_width 4"):
        fastwidth.Consistency(models, probe, tmp_path / "a", reference_width=4)
    with pytest.raises(UserError, match="give \\(x, y\\) tensors"):
        fastwidth.Consistency(models, 3, tmp_path / "a")
    with pytest.raises(UserError, match="param.kind"):
        fastwidth.Consistency(models, probe, tmp_path / "a", kind="µ")
    with pytest.raises(UserError, match="stats.evry"):
        fastwidth.Consistency(models, probe, tmp_path / "a", stats={"evry": 3})
    c = fastwidth.Consistency(models, probe, tmp_path / "a")
    with pytest.raises(UserError, match="steps is not set"):
        c.evaluate(0)
    with pytest.raises(UserError, match="no member 'x'"):
        c.member("x")
    (tmp_path / "b").mkdir()
    RunDir(tmp_path / "b").metrics.write_text("")
    with pytest.raises(UserError, match="already holds a run"):
        fastwidth.Consistency(models, probe, tmp_path / "b")


def test_adapters_without_their_package_say_what_to_install(monkeypatch):
    from fastwidth.interop import callbacks
    real = importlib.import_module

    def gone(name, *a, **k):
        if name.split(".")[0] in ("transformers", "lightning", "pytorch_lightning"):
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(importlib, "import_module", gone)
    callbacks._hf_class.cache_clear()
    callbacks._lightning_class.cache_clear()
    try:
        with pytest.raises(UserError, match="pip install transformers"):
            callbacks.hf_callback(None, "x")
        with pytest.raises(UserError, match="pip install lightning"):
            callbacks.lightning_callback(None, "x")
    finally:
        callbacks._hf_class.cache_clear()
        callbacks._lightning_class.cache_clear()


# --------------------------------------------------------------------------- slow: report, real trainers

@pytest.mark.slow
def test_standin_loop_report(tmp_path):
    c, _ = standin_loop(tmp_path / "run", steps=8, every=4, widths=(16, 32, 64), seeds=(0, 1, 2))
    summary = c.report()
    text = summary.read_text()
    assert "late RMSE" in text and "seed variance V_N" in text
    assert (RunDir(tmp_path / "run").report / "rmse_vs_width.png").is_file()
    data = json.loads((RunDir(tmp_path / "run").report / "summary.json").read_text())
    assert {w["width"] for w in data["widths"]} == {16, 32, 64}
    assert data["run"]["optimizer"] == "user loop" and data["run"]["data_source"] == "probe tensors"
    from fastwidth.cli import main  # `fastwidth report DIR` reads it as any run
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "again")]) in (0, None)
    assert "seed variance V_N" in (tmp_path / "again" / "summary.md").read_text()


def _sequential_hf(c, models, dataset, steps):
    """One HF Trainer per member, one after another, on one dataset and data order."""
    import transformers
    from fastwidth.interop.callbacks import hf_callback
    for name, (model, _, _) in models.items():
        args = transformers.TrainingArguments(output_dir=str(c.run_dir.parent / "hf" / name), max_steps=steps,
                                              per_device_train_batch_size=4, learning_rate=3e-3, seed=0,
                                              logging_steps=1, save_strategy="no", report_to=[],
                                              use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
        transformers.Trainer(model=model, args=args, train_dataset=dataset,
                             callbacks=[hf_callback(c, name)]).train()


def tiny_llama(width: int, seed: int):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=width, intermediate_size=2 * width,
                                   num_hidden_layers=2, num_attention_heads=width // 8, num_key_value_heads=width // 8,
                                   max_position_embeddings=16, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.slow
def test_hf_trainers_of_two_widths_make_one_report(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install accelerate)")
    train, probe = token_data(48)
    dataset = [{"input_ids": s, "labels": s.clone()} for s in train]
    models = {f"llama{w}_{s}": (tiny_llama(w, s), w, s) for w in (16, 32) for s in (0, 1)}
    c = fastwidth.Consistency(models, probe, tmp_path / "run", every=3)
    _sequential_hf(c, models, dataset, steps=6)
    rows = read_metrics(RunDir(tmp_path / "run").metrics)
    cons = [r for r in rows if r["kind"] == "consistency" and r["step"] == 6]
    assert {(r["width"], r["seed"]) for r in cons} == {(16, 0), (16, 1)}
    assert all(r["true_logit_rmse"] > 0 for r in cons)
    evals = [r for r in rows if r["kind"] == "eval" and r["width"] == 32 and r["seed"] == 0]
    assert [r["step"] for r in evals] == [0, 3, 6] and evals[-1]["preact"]  # the Trainer's forwards observed
    assert any(r["kind"] == "train" for r in rows)
    assert (RunDir(tmp_path / "run").report / "summary.md").is_file()


@pytest.mark.slow
def test_lightning_trainers_of_two_widths_make_one_report(tmp_path):
    import lightning.pytorch as pl

    from fastwidth.interop.callbacks import lightning_callback

    class Module(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), 1e-2)

    probe, data = batches(6, batch=8)
    models = family(widths=(16, 32), seeds=(0, 1))
    c = fastwidth.Consistency({k: (m, w, s) for k, (m, w, s) in models.items()}, probe, tmp_path / "run", every=3)
    for name, (net, _, _) in models.items():
        trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[lightning_callback(c, name)])
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]),
                                                                            torch.cat([y for _, y in data])),
                                             batch_size=8, shuffle=False)  # one order for every member
        trainer.fit(Module(net), train_dataloaders=loader)
    rows = read_metrics(RunDir(tmp_path / "run").metrics)
    assert sorted({r["step"] for r in rows if r["kind"] == "eval"}) == [0, 3, 6]
    assert len([r for r in rows if r["kind"] == "train"]) == 6 * len(models)
    assert {(r["width"], r["seed"]) for r in rows if r["kind"] == "consistency"} == {(16, 0), (16, 1)}
    assert (RunDir(tmp_path / "run").report / "summary.md").is_file()


def token_data(n_train: int, n_probe: int = 16):
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 32, (n_train + n_probe, 9), generator=g)
    seqs[:, 1::2] = (seqs[:, 0::2][:, :4] * 3 + 1) % 32  # a learnable rule: odd tokens from the even ones
    return seqs[:n_train, :8], (seqs[n_train:, :8], seqs[n_train:, 1:9])  # probe y: the next token at every position


@pytest.mark.slow
def test_hf_adapter_against_a_standin_driver(tmp_path):
    """The callback's events as transformers.Trainer sends them (trainer.py: on_step_begin once per
    optimizer step, global_step += 1, on_step_end, on_log), driven by hand around tiny Llamas from
    transformers: evaluations at 0 and the schedule's steps, the decoder layers' features and the
    MLP's preactivations read through the roles, train rows from on_log, and the report after the
    last member's on_train_end only."""
    from fastwidth.interop.callbacks import hf_callback
    train, probe = token_data(4 * 8)
    models = {f"llama{w}_{s}": (tiny_llama(w, s), w, s) for w in (16, 32) for s in (0, 1)}
    c = fastwidth.Consistency(models, probe, tmp_path / "run", every=2)
    args = SimpleNamespace(train_batch_size=8, gradient_accumulation_steps=1, world_size=1)
    report = RunDir(tmp_path / "run").report / "summary.md"
    for name, (m, _, _) in models.items():
        cb, state = hf_callback(c, name), SimpleNamespace(global_step=0, max_steps=4)
        opt = torch.optim.AdamW(m.parameters(), 3e-3)
        cb.on_train_begin(args, state, None)
        for x in train.split(8):
            cb.on_step_begin(args, state, None)
            loss = m(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            state.global_step += 1
            cb.on_step_end(args, state, None)
            cb.on_log(args, state, None, logs={"loss": loss.item()})
        assert not report.exists()
        cb.on_train_end(args, state, None)
    assert report.is_file()
    rows = read_metrics(RunDir(tmp_path / "run").metrics)
    assert sorted({r["step"] for r in rows if r["kind"] == "eval"}) == [0, 2, 4]
    assert {r["tokens"] for r in rows if r["kind"] == "eval" and r["step"] == 4} == {32}  # 4 steps x 8 examples
    assert {(r["width"], r["seed"]) for r in rows if r["kind"] == "consistency" and r["step"] == 4} == {(16, 0), (16, 1)}
    assert len([r for r in rows if r["kind"] == "train"]) == 4 * len(models)
    last = next(r for r in rows if r["kind"] == "eval" and r["step"] == 4 and r["width"] == 32)
    assert "model.layers.0.mlp.up_proj" in last["preact"] and "lm_head" not in last["preact"]
    sig = RunDir(tmp_path / "run").list_signatures()["w32_s0"][4]
    from fastwidth.stats.signature import load_signature
    kernels = {k for k in load_signature(sig)[0] if k.startswith("kernel/")}
    assert kernels == {"kernel/block0", "kernel/block1", "kernel/readout_in"}
