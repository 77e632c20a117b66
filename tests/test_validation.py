"""Validation at the door (issue 29, item 3): every value a user can get wrong is one line before
anything trains. Cases of the issue's fault matrix: 4 (seeds), 5-6 (stats.reference_run), 10-11
(non-finite floats), 12 (WORLD_SIZE without a launcher), 18 (resume on re-prepared shards),
19 (data.tokenizer for shards), 20 (out_dir inside data.path), 22 (a resume without metrics.jsonl).

The fast ones run the check functions in-process (config validation is torch-free); the ones that
train are in the slow tier."""
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from fastwidth.config import SEED_MAX, SEED_MIN, Config, dump_yaml, load_config, resolve
from fastwidth.errors import ConfigError, DataError, UserError

ROOT = Path(__file__).resolve().parents[1]


def refused(overrides, *needles):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    text = str(e.value)
    assert "\n" not in text and all(n in text for n in needles), text
    return text


# --------------------------------------------------------------------------- case 4: seeds

def _seed_keys() -> list[str]:
    keys = ["sweep.seeds"]
    for section, cls in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(cls):
            keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls) if f.name.endswith("seed")]
    return keys


def test_every_seed_key_is_held_to_what_every_generator_takes():
    keys = _seed_keys()
    assert {"sweep.seeds", "train.seed", "data.seed", "stats.sketch_seed"} <= set(keys)
    for key in keys:
        for bad in (1 << 64, SEED_MAX + 1, SEED_MIN - 1):  # 2^64 passed on main and crashed at the end
            value = f"[{bad}]" if key == "sweep.seeds" else str(bad)
            refused([f"{key}={value}"], key, "[-2^63, 2^63 - 1]")
        for good in (SEED_MIN, SEED_MAX):
            load_config(None, [f"{key}={f'[{good}]' if key == 'sweep.seeds' else good}"])
    # the range is what the generators fastwidth seeds take: torch's (init, sketch, sharpness start)
    for seed in (SEED_MIN, SEED_MAX):
        torch.Generator().manual_seed(seed)
        np.random.SeedSequence(seed % (1 << 64))
    with pytest.raises((RuntimeError, ValueError), match="Overflow"):
        torch.Generator().manual_seed(1 << 64)


# --------------------------------------------------------------------------- cases 10-11: floats

def _float_keys() -> list[str]:
    out = []
    for section, cls in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(cls):
            hints = typing.get_type_hints(cls)
            out += [f"{section}.{f.name}" for f in dataclasses.fields(cls)
                    if hints[f.name] is float or hints[f.name] == typing.Optional[float]]
    return out


def test_every_float_key_refuses_nan_and_inf_with_its_valid_range():
    keys = _float_keys()
    assert {"optim.lr", "optim.eps", "optim.weight_decay", "optim.grad_clip", "param.output_mult"} <= set(keys)
    for key in keys:
        for bad in (".nan", ".inf", "-.inf", "nan", "inf"):  # YAML's spellings and float()'s strings
            refused([f"{key}={bad}"], key, "is not a finite number", "valid:")
    refused(["optim.lr=.nan"], "optim.lr: nan is not a finite number; valid: > 0")
    refused(["optim.lr=.inf"], "optim.lr: inf is not a finite number; valid: > 0")
    for bad in ("[.nan, 0.99]", "[0.9, .inf]"):
        refused([f"optim.betas={bad}"], "optim.betas", "[0, 1)")


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=0", "optim.lr: 0.0 is out of range; valid: > 0"),
    ("optim.eps=0", "optim.eps: 0.0 is out of range; valid: > 0"),
    ("optim.momentum=1", "optim.momentum: 1.0 is out of range; valid: in [0, 1)"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio: 1.5 is out of range; valid: in [0, 1]"),
    ("stats.hist_quantile=0.5", "stats.hist_quantile: 0.5 is out of range; valid: in [0, 0.5)"),
    ("param.attn_mult=-1", "param.attn_mult: -1.0 is out of range; valid: > 0"),
])
def test_missing_ranges_are_checked(override, needle):
    refused([override], needle)


# --------------------------------------------------------------------------- case 12: WORLD_SIZE

def test_world_size_without_a_launcher_says_how_to_launch(monkeypatch):
    from fastwidth.parallel.env import init_dist, launched_world
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for backend in ("none", "ddp"):  # none: told to set a backend; ddp: trained as a group of one
        with pytest.raises(ConfigError) as e:
            init_dist(load_config(None, [f"dist.backend={backend}"]))
        text = str(e.value)
        assert "\n" not in text and "WORLD_SIZE=2" in text and "torchrun" in text and "unset WORLD_SIZE" in text
    assert "RANK" not in os.environ  # nothing was set up on the way
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not a rank count"):
        launched_world()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert launched_world() == 2  # a launcher's environment passes


# --------------------------------------------------------------------------- case 19: tokenizer

def test_tokenizer_given_for_shards_must_be_theirs(tmp_path):
    """Honoured, not refused: the paper config names `tokenizer: bpe` beside `source: shards`, and the
    manifest records what the shards were prepared with, so a mismatch is one line."""
    from fastwidth.data import build_stream, prepare_source
    from fastwidth.data.shards import check_tokenizer, request_of
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    text = load_config(None, ["data.source=text", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}"]).data
    _, out = prepare_source(text, tmp_path / "shards", workers=1, progress=False)
    shards = ["data.source=shards", f"data.path={out}", "data.seq_len=8", "data.probe_size=2"]
    build_stream(load_config(None, shards).data)  # the default tokenizer: any shards
    with pytest.raises(DataError) as e:  # on main: trained on the byte shards, data.tokenizer ignored
        build_stream(load_config(None, shards + ["data.tokenizer=bpe"]).data)
    assert "\n" not in str(e.value) and f"data.tokenizer=bpe (a BPE of 1024 tokens) but the shards in {out} were " \
        f"prepared with the bytes tokenizer" in str(e.value)
    bpe_300 = {"request": request_of("bpe", 300, 4_000_000)}
    check_tokenizer(out, bpe_300, "bpe", 300, 20_000)  # the bytes BPE trained on are not the tokenizer's name
    with pytest.raises(DataError, match="a BPE of 1024 tokens.* prepared with a BPE of 300 tokens"):
        check_tokenizer(out, bpe_300, "bpe", 1024, 4_000_000)
    with pytest.raises(DataError, match="the tokenizer file .*gpt2, which does not exist"):
        check_tokenizer(out, bpe_300, "gpt2", 1024, 4_000_000)
    load_config(ROOT / "configs/paper/gpt_c4_paper.yaml")  # shards + tokenizer: bpe still loads


# --------------------------------------------------------------------------- case 20: out_dir

def test_out_dir_inside_a_directory_source_is_refused(tmp_path, capsys):
    from fastwidth.cli import main
    from fastwidth.run.prepare import check_outside_data

    def check(*overrides):
        check_outside_data(resolve(load_config(None, list(overrides))))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for out in (corpus, corpus / "run", corpus / "a" / ".." / "b" / "run"):
        with pytest.raises(ConfigError) as e:
            check("data.source=text", f"data.path={corpus}", f"train.out_dir={out}")
        assert "\n" not in str(e.value) and f"train.out_dir {out} is inside data.path {corpus}" in str(e.value)
    with pytest.raises(ConfigError, match="is inside data.path"):
        check("data.source=imagefolder", f"data.path={corpus}/", f"train.out_dir={corpus}/run")
    with pytest.raises(ConfigError, match="is inside data.path"):  # the default out_dir, runs/<name>-<time>
        check("data.source=text", f"data.path={Path.cwd()}")
    check("data.source=text", f"data.path={corpus}", f"train.out_dir={tmp_path / 'corpus-run'}")
    check("data.source=shards", f"data.path={corpus}", f"train.out_dir={corpus / 'run'}")  # reads its manifest only
    (corpus / "a.txt").write_text("some text\n")  # the command: refused before the lock makes the directory
    argv = ["train", "--config", "demo", "--set", "data.source=text", f"data.path={corpus}",
            f"train.out_dir={corpus}/run"]
    assert main(argv) == 2 and capsys.readouterr().err.strip().count("\n") == 0
    assert sorted(p.name for p in corpus.iterdir()) == ["a.txt"]


# --------------------------------------------------------------------------- case 22: metrics gone

def test_resume_without_metrics_says_the_history_is_lost(tmp_path, caplog):
    from fastwidth.run.metrics import read_metrics
    from fastwidth.run.paths import RunDir
    from fastwidth.run.prepare import prepare_run_dir
    cfg = resolve(load_config(None, [f"train.out_dir={tmp_path / 'run'}"]))
    meta = {"step": 7, "members": [{"width": 128, "seed": 0, "step": 7}]}
    with caplog.at_level(logging.WARNING, logger="fastwidth.run"):
        prepare_run_dir(cfg, meta)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "history before step 7 is lost" in lines[0] and "\n" not in lines[0]
    rows = read_metrics(RunDir(tmp_path / "run").metrics)
    assert rows == [{"kind": "history_lost", "step": 7, "tokens": None, "width": 0, "seed": 0}]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastwidth.run"):
        prepare_run_dir(cfg, meta)  # metrics.jsonl present: trimmed, no warning
    assert not caplog.records


# --------------------------------------------------------------------------- case 18: vocabulary

def _tokens(vocab: int, tokenizer: str):
    from fastwidth.data.stream import TokenStream
    ids = np.arange(4096, dtype=np.uint32) % vocab
    return TokenStream([ids], vocab_size=vocab, seq_len=8, batch_size=2, seed=0, epochs=1, probe_size=2, rank=0,
                       world_size=1, holdout_fraction=0.1, name="shards:s", content_id=f"{tokenizer}-{vocab}",
                       info={"tokenizer": tokenizer, "tokenizer_id": tokenizer})


def test_resume_on_another_vocabulary_names_both():
    saved = _tokens(257, "bytes").state_dict()
    _tokens(257, "bytes").check_resume(saved)
    with pytest.raises(DataError) as e:
        _tokens(300, "bpe").check_resume(saved)
    text = str(e.value)
    assert "\n" not in text and "vocabulary of 257 (tokenizer bytes)" in text and "now has 300 (tokenizer bpe)" in text


# --------------------------------------------------------------------------- cases 5-6: reference run

def _fake_reference(root: Path, cfg, stream, steps=(1, 2)) -> list[Path]:
    """A reference run directory as a run writes it, without training: config.yaml, the "data" row,
    and a signature per step of its reference width (what check_reference_run reads)."""
    from fastwidth.run.paths import RunDir
    from fastwidth.stats.signature import ProbeSpec, save_signature
    run = RunDir(root)
    root.mkdir(parents=True)
    run.config.write_text(dump_yaml(cfg))
    run.metrics.write_text(json.dumps({"kind": "data", "step": 0, "tokens": 0, "width": 0, "seed": 0,
                                       **stream.describe()}, default=str) + "\n")
    paths = [run.signature(f"w{cfg.sweep.reference_width}_s0", s) for s in steps]
    sc = cfg.stats
    meta = ProbeSpec.build(stream.probe(), signature_points=sc.signature_points, kernel_points=sc.kernel_points,
                           sketch_dim=sc.sketch_dim, sketch_seed=sc.sketch_seed).meta()
    for p in paths:
        save_signature(p, {"true_logit": torch.zeros(4)}, meta)
    return paths


def test_reference_run_is_checked_at_start(tmp_path):
    from fastwidth.data import build_stream
    from fastwidth.stats.reference import check_reference_run
    base = ["model.arch=mlp", "data.source=synthetic", "data.in_dim=4", "data.probe_size=4", "sweep.widths=[8]"]
    ref_cfg = resolve(load_config(None, base + [f"train.out_dir={tmp_path / 'ref'}"]))
    stream = build_stream(ref_cfg.data)
    sigs = _fake_reference(tmp_path / "ref", ref_cfg, stream)

    def check(*extra):
        cfg = resolve(load_config(None, base + [f"stats.reference_run={tmp_path / 'ref'}", *extra]))
        check_reference_run(cfg, build_stream(cfg.data))

    check()  # the same stream and model family
    for extra, needle in ((["data.seed=1"], "has data.seed=0, this run 1"),
                          (["model.arch=resnet"], "has model.arch='mlp', this run 'resnet'"),
                          (["data.in_dim=5"], "trained on data with fingerprint"),
                          (["stats.sketch_dim=4"], "has sketch_dim=16 in")):
        with pytest.raises(UserError) as e:
            check(*extra)
        assert "\n" not in str(e.value) and needle in str(e.value), str(e.value)
    sigs[-1].write_bytes(sigs[-1].read_bytes()[:-8])  # case 6: the last evaluation's, read mid-run on main
    with pytest.raises(UserError) as e:
        check()
    assert "\n" not in str(e.value) and f"signature {sigs[-1]} cannot be read" in str(e.value)
    sigs[0].write_bytes(b"garbage")  # not safetensors at all: the first bad file is named
    with pytest.raises(UserError, match=f"signature {sigs[0]} cannot be read"):
        check()
    with pytest.raises(UserError, match="is not a run directory"):
        check_reference_run(resolve(load_config(None, base + [f"stats.reference_run={tmp_path}"])), stream)


# --------------------------------------------------------------------------- slow: whole runs

PY = sys.executable
MLP = ["model.arch=mlp", "model.depth=1", "data.source=synthetic", "data.in_dim=8", "data.batch_size=8",
       "data.probe_size=8", "sweep.widths=[16]", "sweep.seeds=[0]", "train.steps=2", "stats.every=1",
       "train.progress=false", "train.report=false", "stats.kernel_points=0", "train.threads=1",
       "param.base_width=16", "optim.warmup_steps=0"]
GPT = ["model.depth=1", "model.head_dim=8", "param.base_width=16", "data.seq_len=16", "data.batch_size=4",
       "data.probe_size=4", "sweep.widths=[16]", "sweep.seeds=[0]", "train.steps=2", "stats.every=1",
       "train.progress=false", "train.report=false", "stats.kernel_points=0", "train.threads=1",
       "optim.warmup_steps=0"]


def cli(*args, env=None):
    run_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([PY, "-m", "fastwidth.cli", *args], capture_output=True, text=True, env=run_env, cwd=ROOT)


def train(*overrides, env=None):
    return cli("train", "--config", "demo", "--set", *overrides, env=env)


def one_line(p, needle):
    err = p.stderr.strip()
    assert p.returncode == 2 and err.count("\n") == 0 and needle in err, (p.returncode, err[-3000:])


@pytest.mark.slow
def test_reference_run_faults_end_in_one_line_before_training(tmp_path):
    cache = f"data.cache_dir={Path.home() / '.cache' / 'fastwidth'}"
    ref = tmp_path / "ref"
    assert train(*GPT, cache, f"train.out_dir={ref}").returncode == 0
    # case 5: another data.seed was compared silently (exit 0) on main
    one_line(train(*GPT, cache, "data.seed=1", f"stats.reference_run={ref}", f"train.out_dir={tmp_path / 'r5'}"),
             "has data.seed=0, this run 1")
    assert not (tmp_path / "r5").exists()
    # case 6: a corrupt signature crashed at the evaluation that read it (42-line traceback)
    bad = sorted((ref / "signatures").glob("*/*.safetensors"))[-1]
    bad.write_bytes(b"garbage")
    one_line(train(*GPT, cache, f"stats.reference_run={ref}", f"train.out_dir={tmp_path / 'r6'}"),
             f"signature {bad} cannot be read")
    assert not (tmp_path / "r6").exists()


@pytest.mark.slow
def test_resume_on_shards_of_another_vocabulary_is_one_line(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for part in range(8):  # the BPE trains on whole files from the head: the tail holds the probe
        (corpus / f"{part}.txt").write_text("".join(f"the quick brown fox {i} jumps over the lazy dog {part}\n"
                                                    for i in range(500)))
    shards, cache = tmp_path / "shards", f"data.cache_dir={tmp_path / 'cache'}"

    def prepare(*tok):
        return cli("data", "prepare", "--source", "text", "--path", str(corpus), *tok, "--out", str(shards),
                   "--no-progress", "--workers", "1", "--set", cache, "data.bpe_train_bytes=20000")
    assert prepare("--tokenizer", "bytes").returncode == 0
    run = [*GPT, "data.source=shards", f"data.path={shards}", "data.holdout_fraction=0.2",
           f"train.out_dir={tmp_path / 'r'}"]
    assert train(*run).returncode == 0
    shutil.rmtree(shards)
    p = prepare("--tokenizer", "bpe", "--bpe-vocab-size", "300")
    assert p.returncode == 0, p.stderr[-2000:]
    before = sorted(str(q.relative_to(tmp_path / "r")) for q in (tmp_path / "r").rglob("*"))
    one_line(train(*run, "train.resume=true", "train.steps=3"), "the run was trained on a vocabulary of")
    assert sorted(str(q.relative_to(tmp_path / "r")) for q in (tmp_path / "r").rglob("*")) == before


@pytest.mark.slow
def test_resume_without_metrics_trains_on_and_the_rows_start_at_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert train(*MLP, f"train.out_dir={out}").returncode == 0
    (out / "metrics.jsonl").unlink()
    p = train(*MLP, f"train.out_dir={out}", "train.resume=true", "train.steps=3")
    assert p.returncode == 0, p.stderr[-2000:]
    warned = [line for line in p.stderr.splitlines() if "history before step 2 is lost" in line]
    assert len(warned) == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kind"] == "history_lost" and rows[0]["step"] == 2
    trained = [r for r in rows if r["kind"] in ("train", "eval")]
    assert trained and all(r["step"] > 2 for r in trained)  # step 3 only: nothing before the checkpoint
    assert cli("report", str(out), "-o", str(tmp_path / "report")).returncode == 0
    assert "**History from step 2**" in (tmp_path / "report" / "summary.md").read_text()
