"""What the depth kinds' residual branch multiplier m_L^-α costs a GPT train step (torch path, CPU).

    python bench/bench_branch.py [--width 64] [--depth 8] [--seq-len 64] [--batch 8] [--steps 20]

One model, timed three ways in one process, alternating step by step to cancel drift on a
shared machine: `none` (branch 1.0, what depth == base_depth runs), `folded` (m_L^-α = 0.5 on
attn.o's and mlp.proj's GEMM alpha and bias: what fastwidth runs) and `separate` (the same
multiplier as its own elementwise pass over each branch's (B, T, N) output, as before the fold).
Rate: tokens/s = batch × seq_len / median seconds of one forward + backward. Rows are appended to
bench/results_branch.csv with the machine and commit; a markdown table is printed.
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
CSV = ROOT / "bench" / "results_branch.csv"
MODES = ("none", "folded", "separate")


def separate_forward(blk, x, cos, sin):
    """The block with the multiplier as a pass of its own over each branch output (the baseline)."""
    a = blk.attn(blk.norm1(x), cos, sin) * blk.branch
    y, x = blk.norm2.with_residual(a, x)
    return x + blk.mlp(y) * blk.branch


def set_mode(model, mode: str, beta: float) -> None:
    for blk in model.blocks:
        blk.branch = beta
        blk.attn.o.branch = blk.mlp.proj.branch = beta if mode == "folded" else 1.0
        if mode == "separate":
            blk.forward = separate_forward.__get__(blk)
        else:
            blk.__dict__.pop("forward", None)


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from fastwidth.config import Config
    from fastwidth.kernels import dispatch
    from fastwidth.models import build_model
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    # one thread: on a shared 2-core machine two threads per process oversubscribe (measured 5 s a
    # step at load 11 against 0.35 s with one)
    torch.set_num_threads(args.threads)
    cfg = Config()
    cfg.model.arch, cfg.model.width, cfg.model.depth, cfg.model.head_dim = "gpt", args.width, args.depth, 32
    cfg.param.kind, cfg.param.base_depth, cfg.param.base_width = "completep", args.depth // 2, 32
    io = SimpleNamespace(kind="tokens", vocab_size=256, seq_len=args.seq_len)
    model, _ = build_model(cfg, io, seed=0)
    beta = model.blocks[0].branch  # (depth / base_depth)^-1 = 0.5
    x = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    times = {m: [] for m in MODES}
    with dispatch.using("torch"):
        for step in range(args.steps + 3):
            for mode in MODES:
                set_mode(model, mode, beta)
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                model.loss(x[:, :-1], x[:, 1:]).backward()
                if step >= 3:  # warm-up steps left out
                    times[mode].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq_len
    med = {m: statistics.median(times[m]) for m in MODES}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    machine = f"{platform.machine()} {torch.get_num_threads()} threads"
    shape = f"gpt w{args.width} d{args.depth} T{args.seq_len} B{args.batch}"
    print(f"| mode ({shape}, torch path) | ms / step | tokens/s | vs none |\n|---|---|---|---|")
    for m in MODES:
        print(f"| {m} | {med[m] * 1e3:.1f} | {tokens / med[m]:.0f} | {med[m] / med['none']:.3f} |")
    new = not CSV.exists()
    with CSV.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["time", "machine", "commit", "shape", "mode", "ms_per_step", "tokens_per_s", "ratio_vs_none"])
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for m in MODES:
            w.writerow([stamp, machine, commit, shape, m, f"{med[m] * 1e3:.2f}", f"{tokens / med[m]:.0f}",
                        f"{med[m] / med['none']:.3f}"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
