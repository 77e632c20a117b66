"""ImageNet-style class folders, decoded once into a cached uint8 array.

    root/<class>/<image>              one split; a fixed held-out share is the probe
    root/train/<class>/..., root/val/<class>/...   val/ is the held-out split

Classes are the sorted subdirectory names of the training split (val/ must use the same names).
Images are converted to RGB, and with data.image_size = S resized (shorter side S, then a
centre crop S x S); with image_size 0 they must all have one size. Decoding runs on all cores
once; the result (x.npy NHWC uint8, y.npy) lives under cache_dir/images/<content hash> and is
then read like the `arrays` source.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np

from fastwidth.data.corpus import hash_files
from fastwidth.data._images_base import IMAGE_SUFFIXES, arrays_stream
from fastwidth.data.shards import _locked
from fastwidth.data.stream import cache_root, hash_json
from fastwidth.errors import DataError


def _scan(split: Path, classes: list[str] | None) -> tuple[list[str], list[Path], list[int]]:
    found = sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = classes or found
    if not found:
        raise DataError(f"{split}: no class folders (ImageNet layout: {split}/<class>/<image>)")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{split}: class folder '{unknown[0]}' is not a training class")
    files, labels = [], []
    for k, c in enumerate(classes):
        if not (split / c).is_dir():
            continue
        for p in sorted((split / c).rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                files.append(p)
                labels.append(k)
    if not files:
        raise DataError(f"{split}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return classes, files, labels


def _decode(args):
    path, size = args
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size:
                w, h = im.size
                s = size / min(w, h)
                im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return f"{path}: cannot be decoded as an image ({str(e)[:80]})"


def _decode_all(files: list[Path], size: int, out_x: Path) -> None:
    from tqdm import tqdm

    jobs = [(f, size) for f in files]
    workers = min(os.cpu_count() or 1, max(1, len(files) // 64))
    x = None
    with (mp.get_context("forkserver").Pool(workers) if workers > 1 else _Serial()) as pool:
        it = pool.imap(_decode, jobs, chunksize=16)
        for i, arr in enumerate(tqdm(it, total=len(files), desc="decode images", disable=len(files) < 2000)):
            if isinstance(arr, str):
                raise DataError(arr)
            if x is None:
                x = np.lib.format.open_memmap(out_x.with_suffix(".tmp.npy"), mode="w+", dtype=np.uint8,
                                              shape=(len(files), *arr.shape))
            if arr.shape != x.shape[1:]:
                raise DataError(f"{files[i]}: image is {arr.shape[1]}x{arr.shape[0]} but the first was "
                                f"{x.shape[2]}x{x.shape[1]}; set data.image_size to resize")
            x[i] = arr
    x.flush()
    del x
    out_x.with_suffix(".tmp.npy").replace(out_x)


class _Serial:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def imap(self, fn, it, chunksize=1):
        return map(fn, it)


def _cached_split(files, labels, size, cache: Path, tag: str) -> Path:
    key = hash_json([tag, hash_files(files, files[0].parents[1], cache), labels, size])[:24]
    out = cache / "images" / key
    with _locked(out):
        if not (out / "x.npy").is_file():
            np.save(out / "y.npy", np.asarray(labels, np.int64))
            _decode_all(files, size, out / "x.npy")
    return out


def imagefolder_stream(d, rank=0, world_size=1):
    root = Path(d.path).expanduser() if d.path else None
    if root is None or not root.is_dir():
        raise DataError(f"data.path {root or '(empty)'}: imagefolder wants a directory of class folders")
    train = root / "train" if (root / "train").is_dir() else root
    classes, files, labels = _scan(train, None)
    if len(classes) > d.num_classes:
        raise DataError(f"{train}: {len(classes)} class folders but data.num_classes={d.num_classes}; "
                        f"set data.num_classes={len(classes)}")
    from fastwidth.data.sanity import check_classes
    check_classes(np.asarray(labels), d.num_classes, train, d.allow_missing_classes, what="images", names=classes)
    cache = cache_root(d)
    tr = _cached_split(files, labels, d.image_size, cache, "train")
    val = None
    if train != root and (root / "val").is_dir():
        _, vfiles, vlabels = _scan(root / "val", classes)
        v = _cached_split(vfiles, vlabels, d.image_size, cache, "val")
        val = (np.load(v / "x.npy", mmap_mode="r"), np.load(v / "y.npy"))
    stream = arrays_stream(d, rank, world_size, name="imagefolder", root=tr, val=val)
    stream.info.update({"path": str(root), "classes": classes[:20], "num_folders": len(classes)})
    return stream
