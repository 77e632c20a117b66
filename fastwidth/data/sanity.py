"""Data that cannot be right, refused at start with one line (each has a config key that allows it).

    check_text(corpus, d.max_undecodable)        # a "text" corpus that is not text
    check_classes(labels, d.num_classes, where, d.allow_missing_classes)

A text file is decoded with replacement, so random bytes (or a binary file given as data.path)
would train a byte model on noise without a word: each sampled file's share of bytes that are
not UTF-8 must stay under data.max_undecodable (1% by default; English text has none, a Latin-1
file has a few percent, random bytes about 40%). A classifier whose training labels hold fewer
classes than data.num_classes (an image folder with one class under a 10-class model) trains a
readout, probe metrics and an eNTK class on classes that never occur.
"""
from __future__ import annotations

import re

import numpy as np

from fastwidth.errors import DataError

SAMPLE_BYTES = 256 * 1024  # read from the head of each sampled file
SAMPLE_FILES = 16          # files sampled, evenly spread over the corpus (first and last included)
_ESCAPED = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8


def undecodable_share(raw: bytes) -> float:
    """Share of `raw`'s bytes that are not part of valid UTF-8 (a character cut at the end counts)."""
    if not raw:
        return 0.0
    text = raw.decode("utf-8", errors="surrogateescape")
    return len(_ESCAPED.findall(text)) / len(raw)


def check_text(corpus, max_share: float) -> None:
    """DataError when a sampled plain-text file of `corpus` is not text (see the module doc)."""
    from fastwidth.data.corpus import kind_of
    files = [f for f in corpus.files if kind_of(f) == "text"]  # jsonl and parquet decode strictly
    if not files or max_share >= 1.0:
        return
    step = max(1, (len(files) - 1) // (SAMPLE_FILES - 1)) if len(files) > 1 else 1
    picked = sorted({*files[::step][:SAMPLE_FILES - 1], files[-1]})
    for f in picked:
        with open(f, "rb") as fh:
            raw = fh.read(SAMPLE_BYTES)
        cut = len(raw) == SAMPLE_BYTES
        share = undecodable_share(raw[:-3] if cut else raw)  # a character cut by the sample is not a fault
        if share > max_share:
            raise DataError(f"{f}: {share:.0%} of its first {len(raw) // 1024 or 1} KB are not UTF-8 text "
                            f"(data.max_undecodable={max_share:g}); give a text file, or raise "
                            f"data.max_undecodable to train on it anyway")


def check_classes(labels: np.ndarray, num_classes: int, where, allow: bool, what: str = "labels",
                  names: list[str] | None = None) -> None:
    """DataError when the training labels hold fewer distinct classes than `num_classes`
    (`names`: what to call label k in the message, e.g. its class folder)."""
    present = np.unique(np.asarray(labels))
    if allow or len(present) >= num_classes:
        return
    shown = [names[k] if names else str(k) for k in present[:10].tolist()]
    shown = ", ".join(shown) + (", ..." if len(present) > 10 else "")
    raise DataError(f"{where}: the training {what} hold {len(present)} of data.num_classes={num_classes} classes "
                    f"({shown}); the readout and the probe's metrics assume all of them: set data.num_classes, "
                    f"or data.allow_missing_classes=true to train anyway")
