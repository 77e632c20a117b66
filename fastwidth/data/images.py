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
import hashlib
import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from fastwidth.data.stream import ClassStream, hash_json, probe_positions, seed_sequence
from fastwidth.errors import DataError

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
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
    from fastwidth.data import cache_root

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
    path.write_text(json.dumps({"mean": mean.tolist(), "std": std.tolist(), "examples": len(ids)}))
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
