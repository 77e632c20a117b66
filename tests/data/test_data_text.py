"""Text sources: stdlib (bytes, bpe), plain files, jsonl(.gz), parquet, tokenizers, caches."""
import gzip
import json
import sys

import numpy as np
import pytest
import torch

from fastwidth.data import build_stream, prepare_source
from fastwidth.data.corpus import open_corpus, stdlib_corpus
from fastwidth.data.tokenizers import load_tokenizer, train_bpe
from fastwidth.errors import DataError


@pytest.mark.slow  # tokenizes the whole stdlib corpus (6 s); the fast GPT tests stream it from the cache
def test_stdlib_bytes_stream_and_cache(dcfg):
    cfg = dcfg(source="stdlib", seq_len=64, batch_size=8)
    s = build_stream(cfg)
    assert s.kind == "tokens" and s.vocab_size == 256
    assert s.info["python"] == ".".join(map(str, sys.version_info[:3]))
    b = s.batch(0)
    assert b["x"].dtype == torch.int64 and b["x"].shape == (8, 64)
    assert torch.equal(b["x"][:, 1:], b["y"][:, :-1])
    # the corpus is the stdlib's text: decoding a window gives Python source
    text = bytes(s.probe()["x"][0].tolist()).decode("utf-8", errors="replace")
    assert text.isprintable() or "\n" in text
    halves = [build_stream(cfg, rank=r, world_size=2).batch(5)["x"] for r in range(2)]
    assert torch.equal(torch.cat(halves), s.batch(5)["x"])
    man, out = prepare_source(cfg)
    assert man["reused"] is True
    stamp = [(p.name, p.stat().st_mtime_ns) for p in sorted(out.glob("shard_*.bin"))]
    again = build_stream(cfg)
    assert again.fingerprint == s.fingerprint and torch.equal(again.batch(3)["x"], s.batch(3)["x"])
    assert stamp == [(p.name, p.stat().st_mtime_ns) for p in sorted(out.glob("shard_*.bin"))]


def test_stdlib_file_list_is_install_independent():
    c = stdlib_corpus()
    rel = [f.relative_to(c.root).as_posix() for f in c.files]
    assert rel == sorted(rel) and "os.py" in rel and "json/decoder.py" in rel
    bad = ("site-packages/", "test/", "idlelib/", "tkinter/", "_sysconfigdata", "lib2to3/", "distutils/")
    assert not [r for r in rel if any(r.startswith(b) or f"/{b}" in r for b in bad)]
    assert "site.py" not in rel and "sysconfig.py" not in rel


def _write_docs(root, n=40, seed=0):
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxing".split()
    docs = [" ".join(rng.choice(words, size=rng.integers(50, 120))) + "." for _ in range(n)]
    return docs


def test_text_dir_jsonl_gz_and_bpe(tmp_path, dcfg):
    docs = _write_docs(tmp_path)
    root = tmp_path / "c4"
    root.mkdir()
    # C4's layout: c4-train.00000-of-01024.json.gz, one JSON object a line with "text"
    for k in range(2):
        with gzip.open(root / f"c4-train.{k:05d}-of-01024.json.gz", "wt") as fh:
            for d in docs[k * 20:(k + 1) * 20]:
                fh.write(json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": "https://x"}) + "\n")
    corpus = open_corpus("text", str(root))
    assert [d for f in corpus.files for d in corpus.documents(f)] == docs
    s = build_stream(dcfg(source="text", path=str(root), tokenizer="bpe", bpe_vocab_size=300, seq_len=16,
                          batch_size=4, probe_size=4, bpe_train_bytes=10_000))
    assert s.vocab_size == 300 and s.info["tokenizer"] == "bpe300"
    tok = load_tokenizer(str(__import__("pathlib").Path(s.info["shards"]) / "tokenizer.json"))
    stream_text = "<|endoftext|>".join(docs) + "<|endoftext|>"
    for row in torch.cat([s.batch(0)["x"], s.probe()["x"]]):
        assert tok.tok.decode(row.tolist(), skip_special_tokens=False) in stream_text


def test_jsonl_errors_name_file_and_line(tmp_path, dcfg):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n{"txt": "no field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 has no field 'text'"):
        build_stream(dcfg(source="text", path=str(p)))
    p.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 is not valid JSON"):
        build_stream(dcfg(source="text", path=str(p)))
    g = tmp_path / "trunc.jsonl.gz"
    g.write_bytes(gzip.compress(b'{"text": "abc"}\n' * 100)[:-20])
    with pytest.raises(DataError, match=r"trunc.jsonl.gz: cannot be read"):
        build_stream(dcfg(source="text", path=str(g)))


def test_missing_and_empty_inputs(tmp_path, dcfg):
    with pytest.raises(DataError, match=r"data.path .*nope does not exist"):
        build_stream(dcfg(source="text", path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no text files"):
        build_stream(dcfg(source="text", path=str(tmp_path / "empty")))
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match=r"corpus is empty"):
        build_stream(dcfg(source="text", path=str(tmp_path / "e.txt")))
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(DataError, match=r"data.seq_len=128"):
        build_stream(dcfg(source="text", path=str(tmp_path / "short.txt")))
    with pytest.raises(DataError, match=r"not one of"):
        build_stream(dcfg(source="wikipedia"))


def test_tokenizer_json_path_and_missing(tmp_path, dcfg):
    docs = _write_docs(tmp_path)
    (tmp_path / "a.txt").write_text("\n".join(docs))
    tok = train_bpe(docs, 280)
    path = tmp_path / "tok.json"
    path.write_text(tok.to_json())
    s = build_stream(dcfg(source="text", path=str(tmp_path / "a.txt"), tokenizer=str(path), seq_len=8,
                          batch_size=2, probe_size=2))
    assert s.vocab_size == 280
    from fastwidth.data.shards import open_shards

    _, maps = open_shards(s.info["shards"])
    assert np.array_equal(np.concatenate(maps), tok.encode_docs(["\n".join(docs)]))
    with pytest.raises(DataError, match=r"missing.json does not exist.*data prepare"):
        build_stream(dcfg(source="text", path=str(tmp_path / "a.txt"), tokenizer=str(tmp_path / "missing.json")))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match=r"broken.json is not a valid tokenizer.json"):
        load_tokenizer(str(tmp_path / "broken.json"))


def test_parquet_wikitext_layout(tmp_path, dcfg):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install pyarrow)")
    import pyarrow.parquet as pq

    rows = [" = Valkyria Chronicles III = \n", " \n", " Senjō no Valkyria 3 : Unrecorded Chronicles is a game .\n"] * 30
    pq.write_table(pa.table({"text": rows}), tmp_path / "train-00000-of-00002.parquet")
    corpus = open_corpus("text", str(tmp_path))
    assert corpus.documents(corpus.files[0]) == ["".join(rows)]
    s = build_stream(dcfg(source="text", path=str(tmp_path), seq_len=32, batch_size=4, probe_size=2))
    assert bytes(s.probe()["x"][0].tolist()).decode("utf-8", "replace")
