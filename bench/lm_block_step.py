"""What the LM block's options cost in train-step time: the demo GPT's step (forward, backward, AdamW)
with the plain block, + grouped-query attention, + QK-norm, + tied embeddings, + z-loss, and all.

    python bench/lm_block_step.py [--width 128] [--rounds 20] [--steps 2] [--threads 1]

One process, every config built once, then `rounds` rounds that each time the configs in turn for
`steps` steps (A B C ... A B C ...), so drift on a shared machine falls on all of them alike. A
config's time is the median of its rounds × steps step times (one step: loss = model.loss(x, y),
backward, optimizer step, zero_grad, on a fixed random batch), after one untimed warm-up step.
Time: the process's CPU seconds of a step (time.process_time, one torch thread), which other
processes on a shared machine disturb far less than wall time (also given); rate: tokens per CPU
second = batch_size × seq_len / median CPU seconds a step; ratio = median / plain's median.
CPU torch path (train.kernels=torch). Writes bench/lm_block_step.md and appends bench/results.csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CSV = ROOT / "bench" / "results.csv"
TABLE = ROOT / "bench" / "lm_block_step.md"

# the demo (configs/demo.yaml: depth 2, head_dim 16, base width 32, seq 64, batch 16, bytes) at one
# width; GQA: n_kv_heads=1 at the base width's 2 heads, a group of 2 (width 128: 8 heads on 4)
CONFIGS = {"plain": [],
           "+GQA": ["model.n_kv_heads=1"],
           "+QK-norm": ["model.qk_norm=true"],
           "+tied": ["model.tie_embeddings=true"],
           "+z-loss": ["train.z_loss=1e-4"],
           "all": ["model.n_kv_heads=1", "model.qk_norm=true", "model.tie_embeddings=true", "train.z_loss=1e-4"]}


def build(width: int, sets: list[str]):
    from fastwidth.config import load_config
    from fastwidth.models import build_model
    from fastwidth.param.optim import build_optimizer
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"model.width={width}", "sweep.widths=[]", *sets])
    io = SimpleNamespace(kind="tokens", vocab_size=256, seq_len=cfg.data.seq_len)
    model, table = build_model(cfg, io)
    return cfg, model, build_optimizer(model, table, cfg)


def step(model, opt, x, y) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one train step."""
    c0, t0 = time.process_time(), time.perf_counter()
    model.loss(x, y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.process_time() - c0, time.perf_counter() - t0


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)  # one: a thread team on a loaded machine stalls on its slowest member (2 threads at load 11: 7 s outliers of a 0.4 s step)
    args = ap.parse_args()
    from fastwidth.kernels import dispatch
    torch.set_num_threads(args.threads)
    dispatch.set_backend("torch")
    built = {name: build(args.width, sets) for name, sets in CONFIGS.items()}
    cfg = built["plain"][0]
    B, T = cfg.data.batch_size, cfg.data.seq_len
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in built}
    for _, model, opt in built.values():
        step(model, opt, x, y)  # warm-up: first-call allocations and lazy inits
    t_start = time.perf_counter()
    for _ in range(args.rounds):
        for name, (_, model, opt) in built.items():
            times[name] += [step(model, opt, x, y) for _ in range(args.steps)]
    wall = time.perf_counter() - t_start
    med = {name: statistics.median(c for c, _ in ts) for name, ts in times.items()}
    wall_med = {name: statistics.median(w for _, w in ts) for name, ts in times.items()}
    base, wall_base = med["plain"], wall_med["plain"]
    commit, machine = git_commit(), f"{platform.machine()} {torch.get_num_threads()} threads"
    shape = (f"demo GPT width {args.width} depth {cfg.model.depth} head_dim {cfg.model.head_dim} "
             f"batch {B}x{T}, {args.rounds}x{args.steps} steps each")
    lines = [f"# LM block step time ({machine}, commit {commit}, torch path, one process, configs alternated)",
             "", f"{shape}; median over the steps; ratio = median / plain's median; {wall:.0f} s of timed steps.",
             "", "| config | CPU ms / step | tokens per CPU s | ratio vs plain | wall ms / step | wall ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in times:
        lines.append(f"| {name} | {med[name] * 1e3:.1f} | {B * T / med[name]:.0f} | {med[name] / base:.3f} | "
                     f"{wall_med[name] * 1e3:.1f} | {wall_med[name] / wall_base:.3f} |")
    lines += ["", f"Load average at the end: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores."]
    text = "\n".join(lines) + "\n"
    TABLE.write_text(text)
    print(text)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with CSV.open("a", newline="") as f:
        w = csv.writer(f)
        for name in times:
            w.writerow([stamp, "lm_block_step", machine, commit, shape, f"cpu_ms_{name}", f"{med[name] * 1e3:.2f}",
                        f"{base * 1e3:.2f}", f"{med[name] / base:.3f}"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
