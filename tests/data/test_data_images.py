"""Image streams on small files written in each source's exact layout, plus real Fashion-MNIST."""
import gzip
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastwidth.data import build_stream
from fastwidth.data.images import FMNIST_DIR
from fastwidth.errors import DataError


def stamp(n, shape, offset=0, hwc=False):
    """uint8 images whose first two pixels (of channel 0) spell their index: every image is identifiable."""
    x = np.random.default_rng(offset).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    ids = np.arange(offset, offset + n)
    if hwc:
        x[:, 0, 0, 0], x[:, 0, 1, 0] = ids % 256, ids // 256
    else:
        flat = x.reshape(n, -1)
        flat[:, 0], flat[:, 1] = ids % 256, ids // 256
    return x


def write_idx(path, arr):
    arr = np.asarray(arr, np.uint8)
    head = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = head + arr.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.fixture
def fmnist_dir(tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte.gz", stamp(53, (28, 28)))
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(53) % 10)
    write_idx(root / "t10k-images-idx3-ubyte.gz", stamp(20, (28, 28), offset=1000))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    return root


def pixel_ids(stream, x):
    """Index stamped into the first two pixels (row-major over C, H, W) of each image."""
    mean = torch.tensor(stream.info["normalize"]["mean"])
    std = torch.tensor(stream.info["normalize"]["std"])
    shape = (1, -1) + (1,) * (x.dim() - 2)
    raw = torch.round((x * std.reshape(shape) + mean.reshape(shape)) * 255).long().reshape(len(x), -1)
    return (raw[:, 0] + 256 * raw[:, 1]).tolist()


def test_fmnist_layout_stream_properties(fmnist_dir, dcfg):
    cfg = dcfg(source="fmnist", path=str(fmnist_dir), batch_size=5, probe_size=7, seed=3)
    s = build_stream(cfg)
    assert s.kind == "classes" and s.in_shape == (1, 28, 28) and s.num_classes == 10
    assert s.steps_available == 53 // 5
    seen = [i for k in range(s.steps_available) for i in pixel_ids(s, s.batch(k)["x"])]
    assert len(set(seen)) == len(seen) == 50 and max(seen) < 53
    b = s.batch(2)
    assert b["x"].dtype == torch.float32 and b["x"].shape == (5, 1, 28, 28)
    assert b["y"].tolist() == [i % 10 for i in pixel_ids(s, b["x"])], "labels travel with their images"
    probe = pixel_ids(s, s.probe()["x"])
    assert all(1000 <= i < 1020 for i in probe) and len(set(probe)) == 7
    allx = torch.cat([s.batch(k)["x"] for k in range(s.steps_available)])
    assert abs(allx.mean()) < 0.1 and abs(allx.std() - 1) < 0.1
    # same probe for another data seed; a different order
    t = build_stream(dcfg(source="fmnist", path=str(fmnist_dir), batch_size=5, probe_size=7, seed=4))
    assert t.fingerprint == s.fingerprint and torch.equal(t.probe()["x"], s.probe()["x"])
    assert not torch.equal(t.batch(0)["x"], s.batch(0)["x"])
    # resume: a fresh stream loaded from a checkpointed state continues the exact sequence
    s.cursor = 0
    for _, _b in zip(range(4), s):
        pass
    r = build_stream(cfg)
    r.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert torch.equal(next(iter(r))["x"], build_stream(cfg).batch(4)["x"])
    four = dict(source="fmnist", path=str(fmnist_dir), batch_size=4, probe_size=7, seed=3)
    parts = [build_stream(dcfg(**four), rank=r, world_size=2).batch(6)["x"] for r in range(2)]
    assert torch.equal(torch.cat(parts), build_stream(dcfg(**four)).batch(6)["x"])


def test_fmnist_bad_files(fmnist_dir, dcfg, tmp_path):
    cfg = dcfg(source="fmnist", path=str(fmnist_dir), batch_size=5, probe_size=7, cache_dir=str(tmp_path / "c"))
    write_idx(fmnist_dir / "train-labels-idx1-ubyte.gz", np.r_[np.arange(52) % 10, 10])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: label 10 is outside the class range \[0, 10\)"):
        build_stream(cfg)
    raw = gzip.decompress((fmnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    (fmnist_dir / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    write_idx(fmnist_dir / "train-labels-idx1-ubyte.gz", np.arange(53) % 10)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: holds .* \(truncated or corrupt\)"):
        build_stream(cfg)
    with pytest.raises(DataError, match=r"does not exist; install it with `apt-get install -y dataset-fashion-mnist`"):
        build_stream(dcfg(source="fmnist", path=str(tmp_path / "none"), probe_size=7))


@pytest.mark.skipif(not Path(FMNIST_DIR).is_dir(),
                    reason=f"Fashion-MNIST not installed ({FMNIST_DIR}): apt-get install -y dataset-fashion-mnist")
@pytest.mark.slow  # reads the whole 60000-image split (9 s in CI)
def test_real_fashion_mnist(dcfg):
    s = build_stream(dcfg(source="fmnist", batch_size=128, probe_size=64))
    assert s.info["train_examples"] == 60000 and s.info["test_images"] == 10000
    assert s.steps_available == 468  # one online pass at batch 128 (docs/design.md's CPU-scale sweep)
    b = s.batch(467)
    assert b["x"].shape == (128, 1, 28, 28) and set(b["y"].tolist()) <= set(range(10))
    assert s.probe()["x"].shape == (64, 1, 28, 28)
    assert abs(s.info["normalize"]["mean"][0] - 0.286) < 0.01 and abs(s.info["normalize"]["std"][0] - 0.353) < 0.01


# --------------------------------------------------------------------------- CIFAR-5m

@pytest.fixture
def cifar_dir(tmp_path):
    root = tmp_path / "cifar5m"
    root.mkdir()
    off = 0
    for k, n in enumerate((37, 23, 41)):
        x = stamp(n, (32, 32, 3), offset=off, hwc=True)
        y = (np.arange(off, off + n) % 10).astype(np.int64)
        save = np.savez_compressed if k == 1 else np.savez  # the published parts are uncompressed
        save(root / f"cifar5m_part{k}.npz", X=x, Y=y)
        off += n
    return root


def test_cifar5m_parts_streamed(cifar_dir, dcfg):
    cfg = dcfg(source="cifar5m", path=str(cifar_dir), batch_size=6, probe_size=5, holdout_fraction=0.1)
    s = build_stream(cfg)
    assert s.in_shape == (3, 32, 32)
    hold = int(np.ceil(0.1 * 101))
    n_train = 101 - hold
    assert s.steps_available == n_train // 6
    seen = [i for k in range(s.steps_available) for i in pixel_ids(s, s.batch(k)["x"])]
    assert len(set(seen)) == len(seen) and max(seen) < n_train
    part = np.searchsorted([37, 60, 101], seen, side="right")
    assert (np.diff(part) != 0).sum() <= 2, "an epoch should walk the parts one after another"
    b = s.batch(1)
    assert b["y"].tolist() == [i % 10 for i in pixel_ids(s, b["x"])]
    probe = pixel_ids(s, s.probe()["x"])
    assert all(i >= n_train for i in probe)
    from fastwidth.data.images import npz_member

    assert isinstance(npz_member(cifar_dir / "cifar5m_part0.npz", "X"), np.memmap)
    single = build_stream(cfg).batch(4)["x"]
    parts = [build_stream(cfg, rank=r, world_size=3).batch(4)["x"] for r in range(3)]
    assert torch.equal(torch.cat(parts), single)


def test_cifar5m_bad_parts(cifar_dir, dcfg):
    cfg = dcfg(source="cifar5m", path=str(cifar_dir), batch_size=6, probe_size=5)
    p0 = cifar_dir / "cifar5m_part0.npz"
    raw = p0.read_bytes()
    p0.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cifar5m_part0.npz: corrupt or truncated npz"):
        build_stream(cfg)
    np.savez(p0, X=stamp(37, (32, 32, 3)), Y=np.full(37, 11))
    with pytest.raises(DataError, match=r"cifar5m_part0.npz: label 11 is outside the class range"):
        build_stream(cfg)
    np.savez(p0, X=stamp(37, (32, 32, 3)), labels=np.zeros(37, int))
    with pytest.raises(DataError, match=r"cifar5m_part0.npz: no array 'Y'"):
        build_stream(cfg)
    # truncate only the image data of a stored member: the header still parses
    np.savez(p0, X=stamp(37, (32, 32, 3)), Y=np.zeros(37, int))
    with zipfile.ZipFile(p0) as zf:
        info = zf.getinfo("X.npy")
    data = p0.read_bytes()
    p0.write_bytes(data[: info.header_offset + 30 + len("X.npy") + 200])
    with pytest.raises(DataError, match=r"cifar5m_part0.npz: corrupt or truncated npz"):
        build_stream(cfg)


# --------------------------------------------------------------------------- folders and arrays

def _png(path, size, color):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder_train_val(tmp_path, dcfg):
    root = tmp_path / "imnet"
    rng = np.random.default_rng(0)
    for split, n in (("train", 9), ("val", 3)):
        for c, cls in enumerate(("n01440764", "n01443537", "n01484850")):
            for i in range(n):
                _png(root / split / cls / f"{cls}_{i}.JPEG", (int(rng.integers(10, 20)), int(rng.integers(10, 20))),
                     (80 * c, i * 20, 7))
    s = build_stream(dcfg(source="imagefolder", path=str(root), image_size=8, num_classes=3, batch_size=3,
                          probe_size=4))
    assert s.in_shape == (3, 8, 8) and s.num_classes == 3 and s.steps_available == 9
    ys = torch.cat([s.batch(k)["y"] for k in range(9)])
    assert sorted(ys.tolist()) == [0] * 9 + [1] * 9 + [2] * 9
    p = s.probe()
    assert p["x"].shape == (4, 3, 8, 8)
    # the red channel encodes the class: label and pixels travel together
    mean, std = s.info["normalize"]["mean"][0], s.info["normalize"]["std"][0]
    red = torch.round((p["x"][:, 0, 4, 4] * std + mean) * 255)
    assert (red - p["y"].float() * 80).abs().max() <= 3  # JPEG is lossy by a few levels
    again = build_stream(dcfg(source="imagefolder", path=str(root), image_size=8, num_classes=3, batch_size=3,
                              probe_size=4))
    assert again.fingerprint == s.fingerprint
    with pytest.raises(DataError, match=r"set data.image_size"):
        build_stream(dcfg(source="imagefolder", path=str(root), num_classes=3, cache_dir=str(tmp_path / "c2")))
    (root / "train" / "n01440764" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"broken.png: cannot be decoded"):
        build_stream(dcfg(source="imagefolder", path=str(root), image_size=8, num_classes=3))


def test_arrays_npz_and_npy(tmp_path, dcfg):
    x = stamp(40, (5, 6))  # (N, H, W) grayscale
    y = np.arange(40) % 4
    np.savez(tmp_path / "a.npz", x=x, y=y)
    s = build_stream(dcfg(source="arrays", path=str(tmp_path / "a.npz"), num_classes=4, batch_size=4, probe_size=3))
    assert s.in_shape == (1, 5, 6)
    seen = [i for k in range(s.steps_available) for i in pixel_ids(s, s.batch(k)["x"])]
    probe = pixel_ids(s, s.probe()["x"])
    assert len(set(seen)) == len(seen) and not set(seen) & set(probe)
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "x.npy", np.random.default_rng(0).standard_normal((30, 7)).astype(np.float32))
    np.save(tmp_path / "d" / "y.npy", np.arange(30) % 3)
    f = build_stream(dcfg(source="arrays", path=str(tmp_path / "d"), num_classes=3, batch_size=5, probe_size=2))
    assert f.in_shape == (7,) and f.batch(0)["x"].shape == (5, 7)
    with pytest.raises(DataError, match=r"y.npy: label 2 is outside the class range \[0, 2\)"):
        build_stream(dcfg(source="arrays", path=str(tmp_path / "d"), num_classes=2))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=r"bad.npz: corrupt or truncated npz"):
        build_stream(dcfg(source="arrays", path=str(tmp_path / "bad.npz")))
