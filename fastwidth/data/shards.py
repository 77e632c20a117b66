"""Token shards: a corpus tokenized once into .bin files that training memory-maps.

Layout of a shard directory:
    manifest.json        format, content hash, tokenizer, vocab, dtype, [{file, tokens}], written last
    shard_00000.bin      64-byte header + tokens (little-endian uint16 or uint32)
    tokenizer.json       when the tokenizer is an HF one (a trained BPE lives beside its shards)

Header: magic b"FWTOKEN1" | uint32 vocab_size | uint32 itemsize (2 or 4) | uint64 token count | zeros.
Documents are concatenated in corpus order, each followed by the tokenizer's EOS.
`prepare` reuses a directory whose manifest has the same input content hash and tokenizer request;
it holds a file lock, so data-parallel ranks that build the same cache wait for one another.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import struct
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fastwidth.data import tokenizers as toks
from fastwidth.data.corpus import Corpus
from fastwidth.errors import DataError

MAGIC = b"FWTOKEN1"
HEADER = 64
FORMAT = "fastwidth-tokens/1"
DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MB of uint16 per file: few memory maps, still fits any filesystem


def _header(vocab_size: int, itemsize: int, count: int) -> bytes:
    return struct.pack("<8sIIQ", MAGIC, vocab_size, itemsize, count).ljust(HEADER, b"\0")


def read_header(path: Path) -> tuple[int, np.dtype, int]:
    """(vocab_size, dtype, token count) of a shard; DataError naming the file when it is malformed."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(HEADER)
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"shard {path}: cannot be read ({e.strerror})") from None
    if len(raw) < HEADER or raw[:8] != MAGIC:
        raise DataError(f"shard {path}: wrong header (not a fastwidth token shard; re-run `fastwidth data prepare`)")
    _, vocab, itemsize, count = struct.unpack("<8sIIQ", raw[:24])
    if itemsize not in (2, 4) or vocab < 1 or (itemsize == 2 and vocab > 1 << 16):
        raise DataError(f"shard {path}: wrong header (vocab {vocab}, itemsize {itemsize})")
    if size != HEADER + count * itemsize:
        raise DataError(f"shard {path}: header says {count} tokens but the file holds "
                        f"{(size - HEADER) / itemsize:g} (truncated or corrupt; re-run `fastwidth data prepare`)")
    return vocab, np.dtype("<u2" if itemsize == 2 else "<u4"), count


def open_shard(path: Path) -> np.memmap:
    _, dtype, count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER, shape=(count,))


class ShardWriter:
    def __init__(self, out: Path, vocab_size: int, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        self.out, self.vocab = out, vocab_size
        self.dtype = np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")
        self.shard_tokens = shard_tokens
        self.shards, self._fh, self._count = [], None, 0

    def _open(self):
        name = f"shard_{len(self.shards):05d}.bin"
        self._fh = open(self.out / name, "wb")
        self._fh.write(_header(self.vocab, self.dtype.itemsize, 0))
        self.shards.append({"file": name, "tokens": 0})
        self._count = 0

    def _close_one(self):
        self._fh.seek(0)
        self._fh.write(_header(self.vocab, self.dtype.itemsize, self._count))
        self._fh.close()
        self.shards[-1]["tokens"] = self._count
        self._fh = None

    def write(self, arr: np.ndarray) -> None:
        arr = np.asarray(arr)
        while arr.size:
            if self._fh is None:
                self._open()
            take = min(arr.size, self.shard_tokens - self._count)
            self._fh.write(arr[:take].astype(self.dtype, copy=False).tobytes())
            self._count += take
            arr = arr[take:]
            if self._count == self.shard_tokens:
                self._close_one()

    def close(self) -> list[dict]:
        if self._fh is not None:
            self._close_one()
        return self.shards


@contextmanager
def _locked(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_manifest(out: Path) -> dict:
    path = Path(out) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{out}: no manifest.json (not a token shard directory); make one with "
                        f"`fastwidth data prepare --source SOURCE --out {out}`")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if man.get("format") != FORMAT or not isinstance(man.get("shards"), list):
        raise DataError(f"{path}: format {man.get('format')!r} is not {FORMAT!r}; re-run `fastwidth data prepare`")
    return man


def open_shards(out: Path) -> tuple[dict, list[np.ndarray]]:
    """The manifest and one memory map per shard, each header checked against the manifest."""
    out = Path(out).expanduser()
    if not out.exists():
        raise DataError(f"data.path {out} does not exist")
    man = load_manifest(out)
    maps = []
    for s in man["shards"]:
        path = out / s["file"]
        if not path.is_file():
            raise DataError(f"shard {path}: missing (listed in {out / 'manifest.json'})")
        vocab, _, count = read_header(path)
        if vocab != man["vocab_size"] or count != s["tokens"]:
            raise DataError(f"shard {path}: wrong header (vocab {vocab}, {count} tokens; the manifest says "
                            f"{man['vocab_size']}, {s['tokens']})")
        maps.append(open_shard(path))
    if sum(len(m) for m in maps) == 0:
        raise DataError(f"{out}: the shards hold no tokens (empty corpus)")
    return man, maps


# --------------------------------------------------------------------------- prepare

_WORKER_TOK = None


def _init_worker(tok_json):
    global _WORKER_TOK
    _WORKER_TOK = toks.ByteTokenizer() if tok_json is None else toks.from_json_str(tok_json, "worker")


def _tokenize_task(args):
    corpus, files, dtype = args
    counts, parts = [], []
    for f in files:
        ids = _WORKER_TOK.encode_docs(corpus.documents(f))
        counts.append(int(ids.size))
        parts.append(ids.astype(dtype))
    return (np.concatenate(parts) if parts else np.zeros(0, dtype)), counts


def _tasks(files: list, target: int) -> list[list]:
    tasks, cur, size = [], [], 0
    for f in files:
        cur.append(f)
        size += f.stat().st_size
        if size >= target:
            tasks.append(cur)
            cur, size = [], 0
    if cur:
        tasks.append(cur)
    return tasks


def _bpe_training_docs(corpus: Corpus, budget: int) -> tuple[list[str], int]:
    """Whole documents from the head of the corpus up to `budget` bytes, capped at half the corpus
    (the held-out tail never feeds the tokenizer); returns (docs, files touched)."""
    budget = min(budget, corpus.total_bytes() // 2 or 1)
    docs, used = [], 0
    for k, f in enumerate(corpus.files):
        for d in corpus.documents(f):
            docs.append(d)
            used += len(d)
            if used >= budget:
                return docs, k + 1
    return docs, len(corpus.files)


def request_of(tokenizer: str, bpe_vocab_size: int, bpe_train_bytes: int) -> dict:
    if tokenizer == "bpe":
        return {"tokenizer": "bpe", "bpe_vocab_size": bpe_vocab_size, "bpe_train_bytes": bpe_train_bytes}
    if tokenizer == "bytes":
        return {"tokenizer": "bytes"}
    # a tokenizer file can change under the same path: its content is part of the request
    p = Path(tokenizer).expanduser().resolve()
    files = [p] if p.is_file() else sorted(f for f in p.glob("*") if f.name in ("tokenizer.json", "vocab.json",
                                                                             "merges.txt")) if p.is_dir() else []
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16] if files else "missing"
    return {"tokenizer": str(p), "sha256": digest}


def _tokenizer_of(request: dict) -> dict:
    """What names a tokenizer in a request: its kind and vocabulary for a BPE trained here (the
    bytes it trained on are prepare's business), the file contents for a tokenizer file."""
    return {k: v for k, v in request.items() if k in ("bpe_vocab_size", "sha256")
            or (k == "tokenizer" and "sha256" not in request)}


def check_tokenizer(out: Path, man: dict, tokenizer: str, bpe_vocab_size: int, bpe_train_bytes: int) -> None:
    """data.tokenizer given for data.source=shards is honoured: the shards must have been prepared
    with it (their manifest's request), else one DataError naming both. The default, bytes, counts
    as not given: shards of any tokenizer train without naming it."""
    if tokenizer == "bytes" or "request" not in man:
        return
    want = request_of(tokenizer, bpe_vocab_size, bpe_train_bytes)
    if _tokenizer_of(want) != _tokenizer_of(man["request"]):
        raise DataError(f"data.tokenizer={tokenizer} ({_describe(want)}) but the shards in {out} were prepared with "
                        f"{_describe(man['request'])}; drop data.tokenizer or prepare the shards with it")


def _describe(request: dict) -> str:
    if "sha256" in request:
        found = request["sha256"] != "missing"
        return f"the tokenizer file {request['tokenizer']}" + ("" if found else ", which does not exist")
    if "bpe_vocab_size" in request:
        return f"a BPE of {request['bpe_vocab_size']} tokens"
    return f"the {request.get('tokenizer')} tokenizer"


def _reusable(out: Path, content: str, request: dict) -> dict | None:
    try:
        man = load_manifest(out)
    except DataError:
        return None
    if man.get("content_hash") != content or man.get("request") != request:
        return None
    try:
        for s in man["shards"]:
            if read_header(out / s["file"])[2] != s["tokens"]:
                return None
    except DataError:
        return None
    return man


def prepare(corpus: Corpus, out: Path, *, tokenizer: str = "bytes", bpe_vocab_size: int = 1024,
            bpe_train_bytes: int = 4_000_000, cache_dir: Path | None = None, workers: int = 0,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool | None = None, log=None) -> dict:
    """Tokenize `corpus` into shards under `out` (or reuse them); returns the manifest."""
    out = Path(out).expanduser()
    request = request_of(tokenizer, bpe_vocab_size, bpe_train_bytes)
    content = corpus.content_hash(cache_dir)
    with _locked(out):
        man = _reusable(out, content, request)
        if man is not None:
            man["reused"] = True
            return man
        t0 = time.perf_counter()
        train_files = 0
        if tokenizer == "bpe":
            docs, train_files = _bpe_training_docs(corpus, bpe_train_bytes)
            key = toks.hash_texts(docs)
            tok = toks.bpe_cached(lambda: docs, bpe_vocab_size, f"{key}-{bpe_train_bytes}", cache_dir or out)
        else:
            tok = toks.load_tokenizer(tokenizer)
        if (out / "manifest.json").exists():
            (out / "manifest.json").unlink()  # never leave a manifest that points at half-written shards
        for old in out.glob("shard_*.bin"):
            old.unlink()
        if tok.to_json() is not None:
            (out / "tokenizer.json").write_text(tok.to_json())
        writer = ShardWriter(out, tok.vocab_size, shard_tokens)
        per_file = _tokenize_all(corpus, tok, writer, workers, progress)
        shards = writer.close()
        total = sum(s["tokens"] for s in shards)
        if total == 0:
            raise DataError(f"{corpus.name}: the corpus is empty after tokenization ({corpus.root})")
        man = {"format": FORMAT, "source": corpus.name, "content_hash": content, "request": request,
               "tokenizer": tok.spec, "tokenizer_id": tok.ident, "vocab_size": tok.vocab_size,
               "eos_id": tok.eos_id, "dtype": str(writer.dtype), "tokens": total, "files": len(corpus.files),
               "tokenizer_train_tokens": int(sum(per_file[:train_files])),
               "shards": shards, "info": corpus.info, "seconds": round(time.perf_counter() - t0, 3)}
        tmp = out / "manifest.json.tmp"
        tmp.write_text(json.dumps(man, indent=1))
        tmp.replace(out / "manifest.json")
        man["reused"] = False
        return man


def _tokenize_all(corpus: Corpus, tok, writer: ShardWriter, workers: int, progress: bool | None) -> list[int]:
    """Tokenize on all cores, writing task results in corpus order; returns per-file token counts."""
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    total = corpus.total_bytes()
    tasks = _tasks(corpus.files, max(1 << 20, min(64 << 20, total // (4 * workers) + 1)))
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"prepare {corpus.name}", disable=not show)
    per_file = []
    jobs = [(corpus, t, writer.dtype) for t in tasks]
    if workers > 1 and len(tasks) > 1:
        # Each worker runs its own single-threaded tokenizer; say so to HF tokenizers before forking.
        old = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            # forkserver, not fork: a process that already runs threads (torch's and OpenMP's pools,
            # the native ops) can fork a child holding a lock no thread will release; seen here as
            # a tokenizer worker stuck in SemLock under the test suite
            ctx = mp.get_context("forkserver")
            with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(tok.to_json(),)) as pool:
                for (arr, cnt), t in zip(pool.imap(_tokenize_task, jobs), tasks):
                    writer.write(arr)
                    per_file += cnt
                    bar.update(sum(f.stat().st_size for f in t))
        finally:
            if old is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = old
    else:
        global _WORKER_TOK
        _WORKER_TOK = tok  # in-process: HF tokenizers parallelizes encode_batch itself
        for job, t in zip(jobs, tasks):
            arr, cnt = _tokenize_task(job)
            writer.write(arr)
            per_file += cnt
            bar.update(sum(f.stat().st_size for f in t))
    bar.close()
    return per_file


def write_token_shards(out: Path, arrays, vocab_size: int, *, source: str = "array",
                       shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict:
    """Shards from token arrays already in memory (tests, converters); the content hash is the tokens'."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer, h = ShardWriter(out, vocab_size, shard_tokens), hashlib.sha256()
    for arr in arrays:
        arr = np.asarray(arr)
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise DataError(f"{source}: token ids must lie in [0, {vocab_size}), got {arr.min()}..{arr.max()}")
        writer.write(arr)
        h.update(arr.astype(writer.dtype).tobytes())
    shards = writer.close()
    man = {"format": FORMAT, "source": source, "content_hash": h.hexdigest(), "request": {"tokenizer": "array"},
           "tokenizer": "array", "tokenizer_id": "array", "vocab_size": vocab_size, "eos_id": None,
           "dtype": str(writer.dtype), "tokens": sum(s["tokens"] for s in shards), "files": 0,
           "tokenizer_train_tokens": 0, "shards": shards, "info": {}}
    (out / "manifest.json").write_text(json.dumps(man, indent=1))
    return man
