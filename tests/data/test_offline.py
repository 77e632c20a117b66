"""Offline training (data.train_size = K): the first K examples of the online order, cycled in one
fixed order; with K >= steps x batch the run is the online run bit for bit; refusals; the
train_subset_* evaluation equals on 2 ranks what one process computes."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fastwidth.config import load_config
from fastwidth.data import build_stream
from fastwidth.data.stream import ClassStream, TokenStream
from fastwidth.errors import ConfigError, DataError
from fastwidth.run.metrics import read_metrics
from fastwidth.trainer.loop import run

TINY_MLP = ["model.arch=mlp", "model.depth=2", "param.base_width=16", "data.source=synthetic",
            "data.batch_size=8", "data.in_dim=6", "data.num_classes=3", "data.probe_size=16",
            "sweep.widths=[16,32]", "sweep.seeds=[0,1]", "train.progress=false", "train.log_every=1",
            "stats.every=3", "train.report=false", "train.threads=1"]


def cfg_of(tmp_path, *extra, out="run"):
    return load_config(None, [*TINY_MLP, f"train.out_dir={tmp_path / out}", *extra])


def class_stream(n=40, batch=8, rank=0, world=1):
    """A ClassStream whose example i is x = [i], y = i % 3 (ids are readable off the batch)."""
    fetch = lambda ids: (torch.as_tensor(np.asarray(ids), dtype=torch.float32)[:, None],  # noqa: E731
                         torch.as_tensor(np.asarray(ids) % 3, dtype=torch.int64))
    probe = (torch.zeros(4, 1), torch.zeros(4, dtype=torch.int64))
    return ClassStream(fetch, probe, n, in_shape=(1,), num_classes=3, batch_size=batch, seed=3, epochs=1,
                       rank=rank, world_size=world, name="toy", content_id="toy")


def test_subset_is_the_online_orders_first_k_cycled():
    online, off = class_stream(), class_stream()
    off.restrict(12)
    first = online.sampler.order(0)[:12]
    served = np.concatenate([off.batch(s)["x"][:, 0].numpy().astype(int) for s in range(4)])
    assert served.tolist() == [int(first[i % 12]) for i in range(32)]          # subset[(s*B + j) mod K]
    assert off.steps_available > 10**9 and off.fingerprint != online.fingerprint
    assert off.describe()["train_size"] == 12
    big = class_stream()
    big.restrict(40)                                                              # K >= steps x B: the online batches
    for s in range(5):
        assert torch.equal(big.batch(s)["x"], online.batch(s)["x"])
    ranks = [class_stream(rank=r, world=2) for r in (0, 1)]
    for st in ranks:
        st.restrict(12)
    for s in range(4):                                                            # the ranks' union is the 1-process batch
        assert torch.equal(torch.cat([st.batch(s)["x"] for st in ranks]), off.batch(s)["x"])
    assert off.train_subset(5)["x"][:, 0].numpy().astype(int).tolist() == first[:5].tolist()


def test_token_windows_subset():
    def stream():
        return TokenStream([np.arange(2000) % 50], vocab_size=50, seq_len=7, batch_size=4, seed=1, epochs=1,
                           probe_size=4, holdout_fraction=0.1, rank=0, world_size=1, name="toy", content_id="toy")
    online, off, big = stream(), stream(), stream()
    n = online.sampler.n
    off.restrict(6)
    big.restrict(n)
    for s in range(3):                                                            # K = the split: the online batches
        assert torch.equal(big.batch(s)["x"], online.batch(s)["x"])
    w = off.sampler.order(0)[:6]
    assert off.batch(1)["x"][:, 0].tolist() == [int(w[i % 6]) * 8 % 50 for i in range(4, 8)]   # window g starts at 8g
    with pytest.raises(DataError, match=f"more than the {n} windows of 8 tokens"):
        stream().restrict(n + 1)


def test_synthetic_subset_and_refusals(tmp_path):
    on = build_stream(cfg_of(tmp_path).data)
    off = build_stream(cfg_of(tmp_path, "data.train_size=20").data)
    assert torch.equal(off.batch(0)["x"], on.batch(0)["x"]) and torch.equal(off.batch(1)["y"], on.batch(1)["y"])
    assert torch.equal(off.batch(2)["x"][:4], on.batch(2)["x"][:4])              # positions 16..19
    assert torch.equal(off.batch(2)["x"][4:], on.batch(0)["x"][:4])              # then 0..3 again
    assert off.fingerprint != on.fingerprint
    with pytest.raises(ConfigError, match="smaller than one batch"):
        cfg_of(tmp_path, "data.train_size=4")
    with pytest.raises(ConfigError, match="full_batch"):
        cfg_of(tmp_path, "data.train_size=16", "train.full_batch=true")
    with pytest.raises(DataError, match="more than the 40 examples"):
        class_stream().restrict(41)


def _run_rows(run_dir: Path):
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = {(r["width"], r["seed"], r["step"]): r["loss"] for r in rows if r["kind"] == "train"}
    evals = {(r["width"], r["seed"], r["step"]): r for r in rows if r["kind"] == "eval"}
    return train, evals


@pytest.mark.slow  # three tiny runs: about 14 s on the shared 2 cores
def test_large_k_equals_online_bit_for_bit(tmp_path):
    online = run(cfg_of(tmp_path, "train.steps=6", out="online"))
    offline = run(cfg_of(tmp_path, "train.steps=6", "data.train_size=48", out="offline"))
    small = run(cfg_of(tmp_path, "train.steps=6", "data.train_size=16", out="small"))
    (t_on, e_on), (t_off, e_off), (t_small, e_small) = map(_run_rows, (online, offline, small))
    assert t_on == t_off and t_small != t_on
    assert {k: r["probe_loss"] for k, r in e_on.items()} == {k: r["probe_loss"] for k, r in e_off.items()}
    final = "checkpoints/step_000006/model.w32_s1.safetensors"
    a, b = load_file(str(online / final)), load_file(str(offline / final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all("train_subset_loss" not in r for r in e_on.values())
    for r in e_off.values():
        assert 0 <= r["train_subset_acc"] <= 1 and r["train_subset_loss"] > 0
    # the subset loss is measured on the subset: the 16-example run fits it better than the probe
    last = e_small[(32, 0, 6)]
    assert last["train_subset_loss"] < last["probe_loss"]


@pytest.mark.slow
@pytest.mark.dist
def test_train_subset_rows_on_two_ranks_equal_one_process(tmp_path):
    from tests.parallel.test_dist import launch

    sets = [*TINY_MLP, "train.steps=4", "data.train_size=24", "data.probe_size=10", "sweep.seeds=[0]"]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({}))
    single = run(load_config(cfg_file, [*sets, f"train.out_dir={tmp_path / 'one'}"]))
    root = Path(__file__).resolve().parents[2]
    launch("torchrun", root / "launch" / "train.py", cfg_file, [*sets, "dist.backend=ddp",
                                                                 f"train.out_dir={tmp_path / 'two'}"])
    _, one = _run_rows(single)
    _, two = _run_rows(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 2 * 3
    for k, r in one.items():  # 10 examples over 2 ranks: 5 each; fp32 forwards, float64 sums
        assert two[k]["train_subset_loss"] == pytest.approx(r["train_subset_loss"], rel=1e-6)
        assert two[k]["train_subset_acc"] == r["train_subset_acc"]
