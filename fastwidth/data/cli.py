"""`fastwidth data prepare` (tokenize a corpus into shards once) and `fastwidth data info`.

    fastwidth data prepare --source text --path c4/ --tokenizer bpe --out shards/c4
    fastwidth data prepare --config configs/gpt_shakespeare.yaml --out shards/shk
    fastwidth data info --config configs/fmnist_mlp.yaml

prepare prints one JSON object (out, tokens, shards, reused, seconds, tokens_per_s); train on the
result with data.source=shards data.path=OUT. Re-running on unchanged input reuses the shards.
An --out that exists and holds anything else is refused unless --force, which replaces it wholly
(the shards are written beside it and swapped in: run/outputs.py); a failed prepare leaves no
half-written --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fastwidth.errors import DataError


def _data_cfg(args):
    from fastwidth.config import load_config

    overrides = [item for group in (args.overrides or []) for item in group]
    for key, flag in (("source", args.source), ("path", args.path), ("tokenizer", args.tokenizer),
                      ("bpe_vocab_size", args.bpe_vocab_size), ("text_field", getattr(args, "text_field", None))):
        if flag is not None:
            overrides.append(f"data.{key}={flag}")
    return load_config(args.config, overrides).data


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config whose data section is used")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", nargs="+",
                   help="override a config key, e.g. --set data.seq_len=256")
    p.add_argument("--source", default=None, help="data.source (stdlib, text, shakespeare, gensim)")
    p.add_argument("--path", default=None, help="data.path: a text file or directory (jsonl[.gz], parquet, text)")
    p.add_argument("--tokenizer", default=None, help="bytes | bpe | tokenizer.json | dir with vocab.json+merges.txt")
    p.add_argument("--bpe-vocab-size", type=int, default=None, help="data.bpe_vocab_size for --tokenizer bpe")
    p.add_argument("--text-field", default=None, help="jsonl field / parquet column holding the text")


def add_prepare_parser(subparsers) -> argparse.ArgumentParser:
    """Add `prepare` to an argparse subparsers object (the `data` group's)."""
    p = subparsers.add_parser("prepare", help="tokenize a text corpus once into token shards (all cores)")
    _add_common(p)
    p.add_argument("--out", default=None, help="shard directory; default: the content-keyed cache")
    p.add_argument("--force", action="store_true", help="replace an existing --out that holds other files "
                   "(wholly: the shards are written beside it, then swapped in); shards of the same input are "
                   "reused without it")
    p.add_argument("--workers", type=int, default=0, help="processes; 0 = all cores")
    p.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard file (default 2^28)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)
    return p


def add_info_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("info", help="describe the stream a config builds (fingerprint, split sizes)")
    _add_common(p)
    p.set_defaults(func=cmd_info)
    return p


def add_data_parser(sub) -> argparse.ArgumentParser:
    """Add the `data` command group (prepare, info) to the top-level subparsers."""
    p = sub.add_parser("data", help="prepare and inspect data sources")
    group = p.add_subparsers(dest="data_command", required=True)
    add_prepare_parser(group)
    add_info_parser(group)
    return p


def cmd_prepare(args) -> int:
    from fastwidth.data import TEXT_SOURCES, prepare_source

    d = _data_cfg(args)
    if d.source not in TEXT_SOURCES:
        raise DataError(f"data prepare: data.source {d.source!r} is not a text source ({', '.join(TEXT_SOURCES)})")
    if args.workers < 0:
        raise DataError(f"--workers {args.workers} must be >= 0 (0 = all cores)")
    t0 = time.perf_counter()
    man, out = _prepare_into(d, Path(args.out).expanduser() if args.out else None, args.force, workers=args.workers,
                             progress=False if args.no_progress else None, shard_tokens=args.shard_tokens)
    dt = time.perf_counter() - t0
    print(json.dumps({"out": str(out), "source": man["source"], "tokenizer": man["tokenizer"],
                      "vocab_size": man["vocab_size"], "tokens": man["tokens"], "shards": len(man["shards"]),
                      "reused": man["reused"], "seconds": round(dt, 3),
                      "tokens_per_s": None if man["reused"] else round(man["tokens"] / max(dt, 1e-9)),
                      "train_with": f"data.source=shards data.path={out}"}))
    return 0


def _prepare_into(d, out: Path | None, force: bool, **kw) -> tuple[dict, Path]:
    """prepare_source into `out` (None: the cache), an existing `out` only as the module docstring says."""
    from fastwidth.data import prepare_source, prepared_shards
    from fastwidth.run.outputs import check_target, replacing

    if out is None:
        return prepare_source(d, None, **kw)
    if out.is_dir() and (man := prepared_shards(d, out)) is not None:
        return man, out
    check_target(out, flag="data prepare --out", force=force, kind="dir")
    corpus = Path(d.path or "").expanduser().resolve()
    if force and out.exists() and d.path and (out.resolve() == corpus or out.resolve() in corpus.parents):
        raise DataError(f"data prepare --out {out} --force would delete the corpus {d.path} inside it; "
                        f"write the shards somewhere else")
    with replacing(out, kind="dir") as tmp:
        man, _ = prepare_source(d, tmp, **kw)
    return man, out


def cmd_info(args) -> int:
    from fastwidth.data import build_stream

    s = build_stream(_data_cfg(args))
    print(json.dumps({"kind": s.kind, **s.describe()}, default=str))
    return 0
