"""Token streams: no repeats, probe disjoint, determinism, rank union, resume, exhaustion."""
import logging

import numpy as np
import pytest
import torch

from fastwidth.data import build_stream
from fastwidth.data.shards import write_token_shards
from fastwidth.errors import DataError


@pytest.fixture
def position_shards(tmp_path):
    """Shards whose token at corpus position i is i: every token says where it came from."""
    n = 5003
    tokens = np.arange(n)
    out = tmp_path / "pos"
    write_token_shards(out, [tokens[:1500], tokens[1500:1501], tokens[1501:]], vocab_size=n, shard_tokens=2222)
    return out, n


def epoch_windows(stream):
    return torch.cat([torch.cat([b["x"], b["y"][:, -1:]], 1) for b in
                      (stream.batch(s) for s in range(stream.steps_per_epoch))])


def test_windows_unique_contiguous_and_probe_disjoint(position_shards, dcfg):
    out, n = position_shards
    s = build_stream(dcfg(source="shards", path=str(out), seq_len=6, batch_size=5, probe_size=9,
                          holdout_fraction=0.05))
    w = epoch_windows(s)  # (steps * 5, 7)
    assert (w[:, 1:] - w[:, :-1] == 1).all(), "a window straddles a shard or is not contiguous"
    flat = w.flatten()
    assert len(set(flat.tolist())) == flat.numel(), "a token was served twice within one pass"
    p = s.probe()
    assert p["x"].shape == (9, 6) and torch.equal(p["x"][:, 1:], p["y"][:, :-1])
    assert p["x"].min() > flat.max(), "probe overlaps the training split"
    # shards of 2222, 2222, 559 tokens; the last ceil(0.05 n) = 251 are held out -> 2222, 2222, 308
    assert [sh["tokens"] for sh in __import__("json").loads((out / "manifest.json").read_text())["shards"]] == [2222, 2222, 559]
    assert s.steps_available == s.steps_per_epoch == (2222 // 7 + 2222 // 7 + 308 // 7) // 5


def test_deterministic_and_seed_independent_probe(position_shards, dcfg):
    out, _ = position_shards
    cfg = dict(source="shards", path=str(out), seq_len=6, batch_size=5)
    a, b, c = (build_stream(dcfg(**cfg, seed=sd)) for sd in (3, 3, 4))
    for step in (0, 7, 31):
        assert torch.equal(a.batch(step)["x"], b.batch(step)["x"])
    assert not torch.equal(a.batch(0)["x"], c.batch(0)["x"])
    assert torch.equal(a.probe()["x"], c.probe()["x"]) and a.fingerprint == c.fingerprint


def test_rank_slices_union_equals_single_stream(position_shards, dcfg):
    out, _ = position_shards
    cfg = dict(source="shards", path=str(out), seq_len=6, batch_size=6, seed=11)
    single = build_stream(dcfg(**cfg))
    ranks = [build_stream(dcfg(**cfg), rank=r, world_size=3) for r in range(3)]
    for step in (0, 5, 40):
        parts = [r.batch(step) for r in ranks]
        assert all(p["x"].shape == (2, 6) for p in parts)
        assert torch.equal(torch.cat([p["x"] for p in parts]), single.batch(step)["x"])
        assert torch.equal(torch.cat([p["y"] for p in parts]), single.batch(step)["y"])
    with pytest.raises(DataError, match="not divisible"):
        build_stream(dcfg(**cfg), rank=0, world_size=4)


def test_resume_continues_the_exact_stream(position_shards, dcfg):
    out, _ = position_shards
    cfg = dcfg(source="shards", path=str(out), seq_len=6, batch_size=5, seed=2)
    ref = build_stream(cfg)
    straight = [b["x"] for _, b in zip(range(12), ref)]
    first = build_stream(cfg)
    for _, _b in zip(range(7), first):
        pass
    state = first.state_dict()
    import json
    state = json.loads(json.dumps(state))  # JSON-able
    second = build_stream(cfg)
    second.load_state_dict(state)
    resumed = [b["x"] for _, b in zip(range(5), second)]
    assert all(torch.equal(x, y) for x, y in zip(straight[7:], resumed))
    other = build_stream(dcfg(source="shards", path=str(out), seq_len=6, batch_size=5, seed=3))
    with pytest.raises(DataError, match="seed"):
        other.load_state_dict(state)


def test_exhaustion_error_and_epochs(position_shards, dcfg, caplog):
    out, _ = position_shards
    s = build_stream(dcfg(source="shards", path=str(out), seq_len=6, batch_size=5))
    with pytest.raises(DataError, match=rf"{s.steps_per_epoch} steps") as e:
        s.check_steps(s.steps_available + 1)
    assert "\n" not in str(e.value)
    s.check_steps(s.steps_available)
    with pytest.raises(DataError, match="allow|holds"):
        s.batch(s.steps_available)
    two = build_stream(dcfg(source="shards", path=str(out), seq_len=6, batch_size=5, epochs=2))
    assert two.steps_available == 2 * s.steps_per_epoch
    spe = two.steps_per_epoch
    with caplog.at_level(logging.WARNING, logger="fastwidth.data"):
        e0 = torch.cat([two.batch(i)["x"][:, 0] for i in range(spe)])
        e1 = torch.cat([two.batch(i)["x"][:, 0] for i in range(spe, 2 * spe)])
    # each pass: no window twice; a new order (and a different dropped remainder) per pass
    assert len(set(e0.tolist())) == len(e0) == len(set(e1.tolist())) and not torch.equal(e0, e1)
    assert sum("repeat" in r.message for r in caplog.records) == 1


def test_seq_len_longer_than_stream(position_shards, dcfg):
    out, _ = position_shards
    with pytest.raises(DataError, match="seq_len=3000"):
        build_stream(dcfg(source="shards", path=str(out), seq_len=3000))


def test_bad_shard_headers(position_shards, dcfg):
    out, _ = position_shards
    shard = out / "shard_00001.bin"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-2])
    with pytest.raises(DataError, match="shard_00001.bin.*truncated"):
        build_stream(dcfg(source="shards", path=str(out)))
    shard.write_bytes(b"GARBAGE!" + raw[8:])
    with pytest.raises(DataError, match="shard_00001.bin: wrong header"):
        build_stream(dcfg(source="shards", path=str(out)))
    with pytest.raises(DataError, match="no manifest.json"):
        build_stream(dcfg(source="shards", path=str(out.parent)))
    with pytest.raises(DataError, match="does not exist"):
        build_stream(dcfg(source="shards", path=str(out / "nope")))


def test_probe_saved_with_fingerprint(position_shards, dcfg, tmp_path):
    from safetensors import safe_open

    out, _ = position_shards
    s = build_stream(dcfg(source="shards", path=str(out), seq_len=6, batch_size=5, probe_size=9))
    s.save_probe(tmp_path / "probe.safetensors")
    with safe_open(str(tmp_path / "probe.safetensors"), "pt") as f:
        assert f.metadata()["fingerprint"] == s.fingerprint
        assert torch.equal(f.get_tensor("x"), s.probe()["x"])
