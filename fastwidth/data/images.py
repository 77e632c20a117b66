"""Image sources: the stream gives x float32 (b, C, H, W), per-channel normalized, and y int64 (b,).

  fmnist       Fashion-MNIST IDX files (data.path, default /usr/share/datasets/fashion-mnist, where
               Debian's `dataset-fashion-mnist` puts them; .gz or raw). Probe: the t10k test set.
  cifar5m      data.path: a directory of CIFAR-5m parts cifar5m_part{k}.npz (X uint8 (N,32,32,3),
               Y labels). Parts are memory-mapped when stored uncompressed (np.savez, the published
               layout) and loaded one at a time otherwise; the epoch order keeps each part
               contiguous, so a batch touches at most two parts. Probe: the tail of the last part.
  imagefolder  data.path: ImageNet-style class folders (root/class/img or root/{train,val}/class/img),
               decoded once (resized to data.image_size) into a cached uint8 array. Probe: val/ when
               present, else a fixed held-out share.
  arrays       data.path: an .npz holding x and y (or X/Y, images/labels), or a directory holding
               x.npy and y.npy (memory-mapped). x: (N, H, W, C) with C in {1, 3}, (N, C, H, W),
               (N, H, W) or (N, D) features. Probe: a fixed held-out share.

Normalization (data.normalize): per-channel mean/std of the training split (uint8 scaled by 1/255),
computed once on up to 20000 evenly spaced training examples and stored under the cache dir.
Held-out shares are chosen with a fixed seed (never data.seed), so the probe is the same in every run.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from fastwidth.data._images_base import (IMAGE_SUFFIXES, Normalizer, _build, arrays_stream,  # noqa: F401
                                         check_labels, file_id, npz_member, npz_shape)
from fastwidth.data.stream import ClassStream, hash_json, probe_positions
from fastwidth.errors import DataError

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"


# --------------------------------------------------------------------------- readers

def read_idx(path: Path) -> np.ndarray:
    """An IDX (MNIST-format) uint8 array, gzip or raw; DataError naming the file when malformed."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:80]})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX uint8 file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    need = 4 + 4 * ndim + int(np.prod(shape))
    if len(raw) != need:
        raise DataError(f"{path}: holds {len(raw)} bytes but its header {shape} needs {need} (truncated or corrupt)")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


# --------------------------------------------------------------------------- sources

def _find_idx(root: Path, stem: str) -> Path:
    for cand in (root / f"{stem}.gz", root / stem, root / stem.replace("-idx", ".idx")):
        if cand.is_file():
            return cand
    raise DataError(f"Fashion-MNIST: {root / stem}[.gz] is missing; install it with `{FMNIST_INSTALL}` "
                    f"or set data.path to a directory holding the IDX files")


def fmnist_stream(d, rank=0, world_size=1) -> ClassStream:
    root = Path(d.path or FMNIST_DIR).expanduser()
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST: directory {root} does not exist; install it with `{FMNIST_INSTALL}` "
                        f"or set data.path to a directory holding the IDX files")
    paths = [_find_idx(root, s) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    xtr, ytr, xte, yte = (read_idx(p) for p in paths)
    for xs, ys, px, py in ((xtr, ytr, paths[0], paths[1]), (xte, yte, paths[2], paths[3])):
        if xs.ndim != 3 or ys.ndim != 1 or len(xs) != len(ys):
            raise DataError(f"{px}: {xs.shape} images do not match {py}: {ys.shape} labels")
    ytr, yte = check_labels(ytr, 10, paths[1]), check_labels(yte, 10, paths[3])
    pos = probe_positions(len(xte), d.probe_size, "fmnist", "test images")
    content = hash_json(["fmnist", *(file_id(p) for p in paths)])
    return _build(d, name="fmnist", rank=rank, world_size=world_size,
                  fetch_raw=lambda ids: (xtr[ids], ytr[ids]), n_train=len(xtr), probe_raw=xte[pos],
                  probe_y=yte[pos], layout="nhw", num_classes=10, content_id=content, dtype=np.uint8,
                  info={"path": str(root), "test_images": len(xte)})

def image_stream(d, rank=0, world_size=1) -> ClassStream:
    if d.source == "fmnist":
        return fmnist_stream(d, rank, world_size)
    if d.source == "arrays":
        return arrays_stream(d, rank, world_size)
    if d.source == "cifar5m":
        from fastwidth.data.cifar5m import cifar5m_stream

        return cifar5m_stream(d, rank, world_size)
    if d.source == "imagefolder":
        from fastwidth.data.folders import imagefolder_stream

        return imagefolder_stream(d, rank, world_size)
    raise DataError(f"data.source {d.source!r} is not an image source (fmnist, cifar5m, imagefolder, arrays)")
