"""What the LM block's options cost in train-step time: the demo GPT's step (forward, backward, AdamW)
with the plain block, + grouped-query attention, + QK-norm, + tied embeddings, + z-loss, and all.

    python bench/lm_block_step.py [--width 256] [--rounds 6] [--steps 4] [--threads 2]

One process, every config built once, then `rounds` rounds that each time the configs in turn for
`steps` steps (A B C ... A B C ...), so drift on a shared machine falls on all of them alike. A
config's time is the median of its rounds × steps step times (one step: loss = model.loss(x, y),
backward, optimizer step, zero_grad, on a fixed random batch), after one untimed warm-up step.
Rate: tokens/s = batch_size × seq_len / median step seconds; ratio = median step / plain's.
CPU torch path (train.kernels=torch). Writes bench/lm_block_step.md and appends bench/results.csv.
"""
from __future__ import annotations

import argparse
import csv
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
# width; GQA: n_kv_heads=1 at the base width's 2 heads, a group of 2 (width 256: 16 heads on 8)
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


def step(model, opt, x, y) -> float:
    t0 = time.perf_counter()
    model.loss(x, y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from fastwidth.kernels import dispatch
    torch.set_num_threads(args.threads)
    dispatch.set_backend("torch")
    built = {name: build(args.width, sets) for name, sets in CONFIGS.items()}
    cfg = built["plain"][0]
    B, T = cfg.data.batch_size, cfg.data.seq_len
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)
    times: dict[str, list[float]] = {name: [] for name in built}
    for _, model, opt in built.values():
        step(model, opt, x, y)  # warm-up: first-call allocations and lazy inits
    t_start = time.perf_counter()
    for _ in range(args.rounds):
        for name, (_, model, opt) in built.items():
            times[name] += [step(model, opt, x, y) for _ in range(args.steps)]
    wall = time.perf_counter() - t_start
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["plain"]
    commit, machine = git_commit(), f"{platform.machine()} {torch.get_num_threads()} threads"
    shape = (f"demo GPT width {args.width} depth {cfg.model.depth} head_dim {cfg.model.head_dim} "
             f"batch {B}x{T}, {args.rounds}x{args.steps} steps each")
    lines = [f"# LM block step time ({machine}, commit {commit}, torch path, one process, configs alternated)",
             "", f"{shape}; median step; ratio = median / plain's median; {wall:.0f} s of timed steps.", "",
             "| config | median step ms | tokens/s | ratio vs plain | min ms | max ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, ts in times.items():
        lines.append(f"| {name} | {med[name] * 1e3:.1f} | {B * T / med[name]:.0f} | {med[name] / base:.3f} | "
                     f"{min(ts) * 1e3:.1f} | {max(ts) * 1e3:.1f} |")
    text = "\n".join(lines) + "\n"
    TABLE.write_text(text)
    print(text)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with CSV.open("a", newline="") as f:
        w = csv.writer(f)
        for name in times:
            w.writerow([stamp, "lm_block_step", machine, commit, shape, f"step_ms_{name}", f"{med[name] * 1e3:.2f}",
                        f"{base * 1e3:.2f}", f"{med[name] / base:.3f}"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
