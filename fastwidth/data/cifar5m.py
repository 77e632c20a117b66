"""CIFAR-5m (Nakkiran et al. 2021): parts cifar5m_part{k}.npz, X uint8 (N, 32, 32, 3), Y labels.

Streamed part by part: only labels (1 byte an image) are read up front; images are memory-mapped
from parts stored uncompressed (np.savez, how the parts are published) or, for compressed parts,
loaded one part at a time (at most two held: a batch can straddle a part boundary because the
epoch order keeps parts contiguous, see Sampler blocks). The held-out probe is the tail of the
last part.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from fastwidth.data._images_base import _build, _hold_count, check_labels, file_id, npz_member, npz_shape
from fastwidth.data.stream import hash_json, probe_positions
from fastwidth.errors import DataError


def _part_key(p: Path):
    m = re.search(r"(\d+)\D*$", p.stem)
    return (int(m.group(1)) if m else -1, p.name)


class Parts:
    """Lazily opened parts with a 2-entry cache (a compressed part is ~3 GB in memory)."""

    def __init__(self, files):
        self.files = files
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def images(self, k: int) -> np.ndarray:
        if k not in self._open:
            self._open[k] = npz_member(self.files[k], "X")
            while len(self._open) > 2:
                self._open.popitem(last=False)
        self._open.move_to_end(k)
        return self._open[k]


def cifar5m_stream(d, rank=0, world_size=1):
    root = Path(d.path).expanduser() if d.path else None
    if root is None or not root.is_dir():
        raise DataError(f"data.path {root or '(empty)'}: cifar5m wants a directory of cifar5m_part*.npz files")
    files = sorted(root.glob("*.npz"), key=_part_key)
    if not files:
        raise DataError(f"data.path {root} holds no .npz parts (cifar5m_part0.npz ...)")
    labels, sizes = [], []
    for f in files:
        shape, dtype = npz_shape(f, "X")  # header only: a compressed part is not inflated here
        if len(shape) != 4 or shape[1:] != (32, 32, 3) or dtype != np.uint8:
            raise DataError(f"{f}: X is {dtype} {shape}, CIFAR-5m parts hold uint8 (N, 32, 32, 3)")
        y = check_labels(np.asarray(npz_member(f, "Y", mmap=False)), 10, f)
        if len(y) != shape[0]:
            raise DataError(f"{f}: {shape[0]} images but {len(y)} labels")
        labels.append(y)
        sizes.append(len(y))
    parts = Parts(files)
    hold = _hold_count(d, sum(sizes))
    if hold >= sizes[-1]:
        raise DataError(f"{files[-1]}: the held-out tail ({hold} images) must fit in the last part ({sizes[-1]}); "
                        f"lower data.holdout_fraction")
    train_sizes = sizes[:-1] + [sizes[-1] - hold]
    starts = np.concatenate([[0], np.cumsum(train_sizes)])
    pos = probe_positions(hold, d.probe_size, "cifar5m", "held-out images")
    last = sizes[-1] - hold + pos
    probe_raw, probe_y = np.asarray(parts.images(len(files) - 1)[last]), labels[-1][last]

    def fetch_raw(ids):
        ids = np.asarray(ids)
        part = np.searchsorted(starts, ids, side="right") - 1
        rows = np.empty((len(ids), 32, 32, 3), np.uint8)
        y = np.empty(len(ids), np.int64)
        for k in np.unique(part):  # one pass per part touched (at most two per batch)
            sel = np.nonzero(part == k)[0]
            local = ids[sel] - starts[k]
            order = np.argsort(local)  # sorted reads are sequential in the memory map
            rows[sel[order]] = parts.images(int(k))[local[order]]
            y[sel] = labels[k][local]
        return rows, y

    content = hash_json(["cifar5m", *(file_id(f) for f in files)])
    return _build(d, name="cifar5m", rank=rank, world_size=world_size, fetch_raw=fetch_raw,
                  n_train=int(starts[-1]), probe_raw=probe_raw, probe_y=probe_y, layout="nhwc",
                  num_classes=10, content_id=content, dtype=np.uint8, blocks=train_sizes,
                  info={"path": str(root), "parts": len(files)})
