"""What every image source shares: the npz readers, label checks, layouts, normalization, the
fixed held-out split, the ClassStream builder, and the arrays source that imagefolder's decoded
cache is read through. images.py (fmnist, arrays, the dispatch), cifar5m.py and folders.py import
from here, never from each other (fastwidth/data/images.py documents the sources).
"""
from __future__ import annotations

import hashlib
import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from fastwidth.data.stream import ClassStream, cache_root, hash_json, probe_positions, seed_sequence
from fastwidth.errors import DataError
from fastwidth.run.checkpoint import atomic_write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_SPLIT_SEED = 0x5B1175  # fixed: the held-out share of an array/folder never depends on data.seed
_STATS_SAMPLE = 20000

def file_id(path: Path) -> str:
    """Content id of a file: sha256 of all of it up to 64 MB, else of its size and 3 spread 4 MB chunks
    (CIFAR-5m parts are 3 GB each; the probe's own hash still enters the fingerprint)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= 64 << 20:
            h.update(fh.read())
        else:
            for off in (0, size // 2, size - (4 << 20)):
                fh.seek(off)
                h.update(fh.read(4 << 20))
    return h.hexdigest()


# --------------------------------------------------------------------------- readers

def npz_member(path: Path, key: str, *, mmap: bool = True) -> np.ndarray:
    """One array of an .npz: memory-mapped when the member is stored uncompressed, else loaded."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: corrupt or truncated npz ({str(e)[:80]})") from None
    with zf:
        names = {n[:-4] if n.endswith(".npy") else n: n for n in zf.namelist()}
        if key not in names:
            raise DataError(f"{path}: no array '{key}' (holds {', '.join(sorted(names)) or 'nothing'})")
        info = zf.getinfo(names[key])
        try:
            if mmap and info.compress_type == zipfile.ZIP_STORED:
                with open(path, "rb") as fh:
                    fh.seek(info.header_offset)
                    local = fh.read(30)
                    n_name, n_extra = struct.unpack("<HH", local[26:30])
                    fh.seek(info.header_offset + 30 + n_name + n_extra)
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(fh)
                    offset = fh.tell()
                nbytes = int(np.prod(shape)) * dtype.itemsize
                if fortran or offset + nbytes > path.stat().st_size:
                    raise ValueError(f"array '{key}' needs {nbytes} bytes past offset {offset}")
                if nbytes == 0:
                    return np.zeros(shape, dtype)
                return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
            with zf.open(info) as fh:
                return np.lib.format.read_array(fh)
        except (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile, struct.error) as e:
            raise DataError(f"{path}: corrupt or truncated npz ({str(e)[:100]})") from None


def npz_shape(path: Path, key: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of an .npz member from its header alone (no decompression of the data)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n[:-4] if n.endswith(".npy") else n: n for n in zf.namelist()}
            if key not in names:
                raise DataError(f"{path}: no array '{key}' (holds {', '.join(sorted(names)) or 'nothing'})")
            if zf.getinfo(names[key]).compress_type == zipfile.ZIP_STORED:
                m = npz_member(path, key)  # a lazy memory map: checks the data fits the file
                return m.shape, m.dtype
            with zf.open(names[key]) as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(fh)
                return shape, dtype
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error, struct.error) as e:
        raise DataError(f"{path}: corrupt or truncated npz ({str(e)[:80]})") from None


def check_labels(y: np.ndarray, num_classes: int, where) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise DataError(f"{where}: label {bad} is outside the class range [0, {num_classes})")
    return y.astype(np.int64)


def _layout(x: np.ndarray, where) -> str:
    """'nhwc', 'nchw' or 'flat' for an image array; DataError for shapes that are neither."""
    if x.ndim == 4 and x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
        return "nhwc"
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return "nchw"
    if x.ndim == 3:
        return "nhw"
    if x.ndim == 2:
        return "flat"
    raise DataError(f"{where}: images of shape {x.shape} are not (N,H,W,C), (N,C,H,W), (N,H,W) or (N,D)")


def _to_nchw(rows: np.ndarray, layout: str) -> np.ndarray:
    if layout == "nhwc":
        return rows.transpose(0, 3, 1, 2)
    if layout == "nhw":
        return rows[:, None]
    return rows


class Normalizer:
    """x -> (x * scale - mean[c]) / std[c] over the channel axis 1 (uint8: scale 1/255)."""

    def __init__(self, mean, std, scale: float):
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.scale = np.float32(scale)

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        x = x.astype(np.float32) * self.scale
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return torch.from_numpy((x - self.mean.reshape(shape)) / self.std.reshape(shape))


def _normalizer(d, sample_fn, n_train: int, dtype, key: str) -> Normalizer:
    scale = 1 / 255 if dtype == np.uint8 else 1.0
    if not d.normalize:
        return Normalizer([0.0], [1.0], scale)
    path = cache_root(d) / "stats" / f"{key[:32]}.json"
    if path.is_file():
        s = json.loads(path.read_text())
        return Normalizer(s["mean"], s["std"], scale)
    ids = (np.arange(min(n_train, _STATS_SAMPLE)) * n_train) // min(n_train, _STATS_SAMPLE)
    x = sample_fn(ids).astype(np.float64) * scale  # (n, C, ...)
    axes = (0,) + tuple(range(2, x.ndim))
    mean, std = x.mean(axis=axes), x.std(axis=axes)
    std = np.where(std > 0, std, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: a file cut short by a full disk would be read back as the statistics of every later run
    atomic_write_text(path, json.dumps({"mean": mean.tolist(), "std": std.tolist(), "examples": len(ids)}))
    return Normalizer(mean, std, scale)


def _fixed_split(n: int, hold: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows sorted, held-out rows sorted) from a seed-free permutation of n rows."""
    perm = np.random.Generator(np.random.PCG64(seed_sequence(_SPLIT_SEED))).permutation(n)
    return np.sort(perm[hold:]), np.sort(perm[:hold])


def _build(d, *, name, rank, world_size, fetch_raw, n_train, probe_raw, probe_y, layout, num_classes,
           content_id, dtype, blocks=None, info=None) -> ClassStream:
    """Common tail: normalization, probe tensors, the ClassStream around `fetch_raw(ids) -> rows`."""
    norm = _normalizer(d, lambda ids: _to_nchw(fetch_raw(ids)[0], layout), n_train, dtype, content_id)

    def fetch(ids):
        rows, y = fetch_raw(ids)
        return norm(_to_nchw(rows, layout)), torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    px = norm(_to_nchw(probe_raw, layout))
    info = {**(info or {}), "normalize": {"mean": norm.mean.tolist(), "std": norm.std.tolist()}}
    return ClassStream(fetch, (px, torch.from_numpy(probe_y.astype(np.int64))), n_train,
                       in_shape=tuple(px.shape[1:]), num_classes=num_classes, batch_size=d.batch_size,
                       seed=d.seed, epochs=d.epochs, rank=rank, world_size=world_size, name=name,
                       content_id=hash_json([content_id, d.normalize]), blocks=blocks, info=info)

def _hold_count(d, n: int) -> int:
    return max(int(np.ceil(d.holdout_fraction * n)), d.probe_size)


def _load_arrays(root: Path):
    if root.is_dir():
        px, py = root / "x.npy", root / "y.npy"
        for p in (px, py):
            if not p.is_file():
                raise DataError(f"data.path {root}: {p.name} is missing (arrays wants x.npy and y.npy, or an .npz)")
        try:
            return np.load(px, mmap_mode="r"), np.load(py), [px, py]
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{root}: x.npy / y.npy cannot be read ({str(e)[:100]})") from None
    names = zipfile.ZipFile(root).namelist() if zipfile.is_zipfile(root) else []
    if not names:
        raise DataError(f"{root}: corrupt or truncated npz (not a zip archive)")
    keys = {n[:-4] for n in names}
    for kx, ky in (("x", "y"), ("X", "Y"), ("images", "labels")):
        if kx in keys and ky in keys:
            return npz_member(root, kx), npz_member(root, ky, mmap=False), [root]
    raise DataError(f"{root}: holds {', '.join(sorted(keys))}; arrays wants x/y, X/Y or images/labels")


def arrays_stream(d, rank=0, world_size=1, *, name="arrays", root=None, val=None) -> ClassStream:
    root = Path(root or d.path).expanduser()
    if not str(root) or not root.exists():
        raise DataError(f"data.path {root} does not exist (arrays wants an .npz or a directory of x.npy, y.npy)")
    x, y, files = _load_arrays(root)
    where = files[-1]
    if len(x) != len(y):
        raise DataError(f"{root}: {len(x)} images but {len(y)} labels")
    layout = _layout(x, root)
    y = check_labels(np.asarray(y), d.num_classes, where)
    from fastwidth.data.sanity import check_classes
    check_classes(y, d.num_classes, where, d.allow_missing_classes)
    if val is not None:  # an explicit held-out set (imagefolder val/)
        vx, vy = val
        train_rows, pos = np.arange(len(x)), probe_positions(len(vx), d.probe_size, name, "held-out images")
        probe_raw, probe_y = vx[pos], vy[pos]
    else:
        train_rows, held = _fixed_split(len(x), _hold_count(d, len(x)))
        pos = probe_positions(len(held), d.probe_size, name, "held-out examples")
        probe_raw, probe_y = x[held[pos]], y[held[pos]]
    content = hash_json([name, *(file_id(f) for f in files)])
    return _build(d, name=name, rank=rank, world_size=world_size,
                  fetch_raw=lambda ids: (x[train_rows[ids]], y[train_rows[ids]]), n_train=len(train_rows),
                  probe_raw=probe_raw, probe_y=probe_y, layout=layout, num_classes=d.num_classes,
                  content_id=content, dtype=x.dtype, info={"path": str(root)})
