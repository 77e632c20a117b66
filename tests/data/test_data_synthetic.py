"""Synthetic teacher stream: determinism, fresh batches, rank union, probe independence."""
import numpy as np
import pytest
import torch

from fastwidth.data import build_stream
from fastwidth.errors import DataError


def test_teacher_labels_and_determinism(dcfg):
    cfg = dcfg(source="synthetic", in_dim=7, teacher_width=13, num_classes=5, batch_size=12, seed=4)
    a, b = build_stream(cfg), build_stream(cfg)
    assert a.kind == "classes" and a.in_shape == (7,) and a.num_classes == 5
    x, y = a.batch(9)["x"], a.batch(9)["y"]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (12, 7)
    assert torch.equal(x, b.batch(9)["x"]) and torch.equal(y, b.batch(9)["y"])
    # labels are the teacher's argmax (recomputed here from its weights, in float64)
    t = a.teacher
    h = np.maximum(x.double().numpy() @ t.w1.T + t.b1, 0) - t.h_mean
    assert np.array_equal((h @ t.w2.T).argmax(1), y.numpy())
    assert not torch.equal(a.batch(10)["x"], x), "a step must bring new inputs"
    other = build_stream(dcfg(source="synthetic", in_dim=7, teacher_width=13, num_classes=5, batch_size=12, seed=5))
    assert not torch.equal(other.batch(9)["x"], x) and other.fingerprint != a.fingerprint


def test_probe_is_fixed_and_apart_from_training(dcfg):
    cfg = dcfg(source="synthetic", batch_size=16, probe_size=32)
    s = build_stream(cfg)
    p = s.probe()
    assert p["x"].shape == (32, 32) and torch.equal(p["x"], build_stream(cfg).probe()["x"])
    train = torch.cat([s.batch(i)["x"] for i in range(50)])
    assert torch.cdist(p["x"], train).min() > 1e-3
    counts = torch.bincount(torch.cat([s.batch(i)["y"] for i in range(50)]), minlength=10)
    assert (counts > 0).all(), "the teacher should use every class"


def test_rank_union(dcfg):
    cfg = dcfg(source="synthetic", batch_size=6, seed=1)
    single = build_stream(cfg).batch(3)
    parts = [build_stream(cfg, rank=r, world_size=3).batch(3) for r in range(3)]
    assert torch.equal(torch.cat([p["x"] for p in parts]), single["x"])
    assert torch.equal(torch.cat([p["y"] for p in parts]), single["y"])
    with pytest.raises(DataError, match="data.batch_size 6 is not divisible"):
        build_stream(cfg, rank=0, world_size=4)


def test_label_noise_flips_training_labels_only(dcfg):
    clean = build_stream(dcfg(source="synthetic", batch_size=4000, probe_size=64, num_classes=5))
    noisy = build_stream(dcfg(source="synthetic", batch_size=4000, probe_size=64, num_classes=5, label_noise=0.4))
    a, b = clean.batch(2), noisy.batch(2)
    assert torch.equal(a["x"], b["x"]) and torch.equal(clean.probe()["y"], noisy.probe()["y"])
    # a flipped label is a uniform class: it differs from the teacher's with probability 0.4 × 4/5
    assert (a["y"] != b["y"]).float().mean().item() == pytest.approx(0.32, abs=0.03)
    assert torch.equal(b["y"], build_stream(dcfg(source="synthetic", batch_size=4000, probe_size=64, num_classes=5,
                                                 label_noise=0.4)).batch(2)["y"])
    parts = [build_stream(dcfg(source="synthetic", batch_size=4000, num_classes=5, label_noise=0.4), rank=r,
                          world_size=2).batch(2)["y"] for r in range(2)]
    assert torch.equal(torch.cat(parts), b["y"])                      # every rank draws the same flips
    assert noisy.fingerprint != clean.fingerprint
    assert clean.fingerprint == build_stream(dcfg(source="synthetic", batch_size=4000, probe_size=64,
                                                  num_classes=5, label_noise=0.0)).fingerprint
