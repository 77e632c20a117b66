"""Tokenizers: bytes (vocab 256), a ByteLevel BPE trained offline, a tokenizer.json, GPT-2 files.

    tok = load_tokenizer("bytes")                 # or "path/tokenizer.json", "dir/with/vocab.json+merges.txt"
    tok = train_bpe(texts, vocab_size=1024)       # HF tokenizers, deterministic for a given input
    ids = tok.encode_docs(["doc one", "doc two"]) # one uint32 array, each document followed by EOS

Every tokenizer has a content id (`tok.ident`) that enters the stream fingerprint, so runs with
different tokenizers never claim to share a probe split.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from fastwidth.errors import DataError

EOS = "<|endoftext|>"
_HOW = ("use data.tokenizer=bytes, data.tokenizer=bpe (trained on the corpus), or make one with "
        "`fastwidth data prepare --tokenizer bpe --out DIR` (writes DIR/tokenizer.json)")


class ByteTokenizer:
    """UTF-8 bytes; NUL (id 0, absent from text) separates documents."""

    vocab_size = 256
    eos_id = 0
    ident = "bytes"
    spec = "bytes"

    def encode_docs(self, docs: Sequence[str]) -> np.ndarray:
        # Python joins in C: one pass, no per-token work (≈1 GB/s).
        blob = "\0".join(docs).encode("utf-8", errors="replace") + b"\0"
        return np.frombuffer(blob, dtype=np.uint8).astype(np.uint32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_json(self) -> str | None:
        return None


class HFTokenizer:
    """Any HF `tokenizers` tokenizer; EOS is <|endoftext|> when it has one."""

    def __init__(self, tok, spec: str):
        self.tok = tok
        self.spec = spec
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = tok.token_to_id(EOS)
        self.ident = "hf:" + hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]

    def _splittable(self) -> bool:
        """True when cutting a document after a lone newline (non-space on both sides) cannot change
        its tokens: ByteLevel pre-tokenization (GPT-2 regex) makes such a newline a pre-token of its
        own, and BPE never merges across pre-tokens. Other pipelines are encoded whole."""
        tk = _hf()
        return self.tok.normalizer is None and isinstance(self.tok.pre_tokenizer, tk.pre_tokenizers.ByteLevel)

    def encode_docs(self, docs: Sequence[str]) -> np.ndarray:
        if not docs:
            return np.zeros(0, np.uint32)
        # Long documents (whole plays, books) are cut into ~16 KB pieces so encode_batch spreads
        # them over all cores; 1 doc of 134 KB: 0.12 s whole, 0.09 s in pieces on one core.
        pieces, owner = [], []
        split = self._splittable()
        for k, d in enumerate(docs):
            for piece in (_pieces(d, _PIECE) if split else [d]):
                pieces.append(piece)
                owner.append(k)
        encs = self.tok.encode_batch(pieces, add_special_tokens=False)
        parts = []
        for i, e in enumerate(encs):
            parts.append(np.asarray(e.ids, dtype=np.uint32))
            last = i + 1 == len(encs) or owner[i + 1] != owner[i]
            if last and self.eos_id is not None:
                parts.append(np.array([self.eos_id], dtype=np.uint32))
        return np.concatenate(parts) if parts else np.zeros(0, np.uint32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def to_json(self) -> str:
        return self.tok.to_str()


_PIECE = 16384


def _pieces(doc: str, size: int) -> list[str]:
    """Cut `doc` after lone newlines (non-space on both sides), about every `size` characters."""
    if len(doc) <= 2 * size:
        return [doc]
    out, start = [], 0
    while len(doc) - start > 2 * size:
        i = doc.find("\n", start + size)
        # a lone newline between two non-space characters: "\n\n" would pre-tokenize differently
        # at the end of a piece ("ĊĊ") than inside the document ("Ċ", "Ċ")
        while i != -1 and i + 1 < len(doc) and (doc[i + 1].isspace() or doc[i - 1].isspace()):
            i = doc.find("\n", i + 1)
        if i == -1 or i + 1 >= len(doc):
            break
        out.append(doc[start:i + 1])
        start = i + 1
    out.append(doc[start:])
    return out


def _hf():
    try:
        import tokenizers
    except ImportError:  # a core dependency, but say how to fix a broken environment
        raise DataError("data.tokenizer: the `tokenizers` package is missing; install it with "
                        "`pip install -c constraints.txt tokenizers`") from None
    return tokenizers


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A ByteLevel BPE (GPT-2 style pre-tokenization, no prefix space) with an EOS special token."""
    tk = _hf()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, f"bpe{vocab_size}")


def _gpt2(vocab: Path, merges: Path) -> HFTokenizer:
    tk = _hf()
    tok = tk.Tokenizer(tk.models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    return HFTokenizer(tok, f"gpt2:{vocab.parent}")


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """'bytes', a tokenizer.json, a GPT-2 vocab.json (merges.txt beside it) or a directory holding one."""
    if spec == "bytes":
        return ByteTokenizer()
    p = Path(spec).expanduser()
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return _gpt2(p / "vocab.json", p / "merges.txt")
        else:
            raise DataError(f"data.tokenizer: directory {p} holds neither tokenizer.json nor vocab.json + "
                            f"merges.txt; {_HOW}")
    if not p.is_file():
        raise DataError(f"data.tokenizer: {p} does not exist; {_HOW}")
    if p.name.endswith("vocab.json"):
        merges = p.with_name(p.name.replace("vocab.json", "merges.txt"))
        if not merges.is_file():
            raise DataError(f"data.tokenizer: GPT-2 vocab {p} needs {merges} beside it")
        return _gpt2(p, merges)
    tk = _hf()
    try:
        tok = tk.Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"data.tokenizer: {p} is not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None
    return HFTokenizer(tok, str(p))


def from_json_str(text: str, spec: str) -> HFTokenizer:
    return HFTokenizer(_hf().Tokenizer.from_str(text), spec)


def bpe_cached(texts_fn, vocab_size: int, key: str, cache_dir: Path) -> HFTokenizer:
    """Train (or reuse) a BPE keyed by `key` (a hash of its training text) under cache_dir/tokenizers."""
    path = cache_dir / "tokenizers" / f"bpe{vocab_size}-{key[:16]}.json"
    if path.is_file():
        try:
            return from_json_str(path.read_text(), f"bpe{vocab_size}")
        except Exception:
            pass  # a torn write from an interrupted run: retrain below
    tok = train_bpe(texts_fn(), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{np.random.randint(1 << 30)}")
    tmp.write_text(tok.to_json())
    tmp.replace(path)
    return tok


def hash_texts(texts) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", errors="replace") + b"\0")
    return h.hexdigest()


def describe(tok) -> dict:
    return {"tokenizer": tok.spec, "tokenizer_id": tok.ident, "vocab_size": tok.vocab_size}


__all__ = ["ByteTokenizer", "HFTokenizer", "train_bpe", "load_tokenizer", "bpe_cached", "EOS", "describe", "hash_texts",
           "from_json_str"]
