"""eNTK per-point gradients: torch.func batched (vmap(jacrev) in chunks) against one backward per
point, on the project's µP MLP, same process, alternating.

    .venv/bin/python bench/bench_ntk.py [--width 256] [--points 128] [--reps 3] [--method exact]

After one untimed warm-up of both, each repetition times entk(...) once with batched gradients and once with the per-point loop
(kernels=torch, as the monitor runs it), in alternating order so load from other processes hits
both alike; the kernels must agree (checked). Reported: median seconds of each and
    speedup = median(loop) / median(batched)   (and the ratio of the minima, the least-disturbed runs)
and points/s = points / median. A row is appended to bench/results_ntk.csv with the machine and
the git commit.
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train import git_commit  # noqa: E402
from fastwidth.config import load_config  # noqa: E402
from fastwidth.kernels import dispatch  # noqa: E402
from fastwidth.models import build_model  # noqa: E402
from fastwidth.stats.ntk import entk, probe_output_fn  # noqa: E402


def setup(width: int, points: int, depth: int = 3):
    """A µP MLP (Fashion-MNIST shapes: 784 inputs, 10 classes, non-zero readout) and its probe output."""
    io = SimpleNamespace(kind="classes", in_shape=(784,), num_classes=10)
    cfg = load_config(None, ["model.arch=mlp", f"model.depth={depth}", f"model.width={width}", "param.base_width=64",
                             "param.zero_readout=false"])
    model, _ = build_model(cfg, io, seed=0)
    model.eval()
    g = torch.Generator().manual_seed(0)
    probe = {"x": torch.randn(points, 784, generator=g), "y": torch.randint(0, 10, (points,), generator=g)}
    return model, probe_output_fn(model, probe, points, "cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--points", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--method", default="exact", choices=["exact", "fd"])
    ap.add_argument("--max-mb", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--csv", default=str(ROOT / "bench" / "results_ntk.csv"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, out = setup(args.width, args.points)
    params = [p for p in model.parameters() if p.requires_grad]
    times = {"vmap": [], "loop": []}
    kernels, chunk = {}, 0
    with dispatch.using("torch"):
        for rep in range(-1, args.reps):      # rep -1: warm-up of both (first-call costs), not timed
            for mode in (("vmap", "loop") if rep % 2 == 0 else ("loop", "vmap")):
                info: dict = {}
                t0 = time.perf_counter()
                K, _ = entk(out.fn, out.n, params, method=args.method, max_bytes=args.max_mb << 20,
                            batched=out.batched if mode == "vmap" else None, info=info)
                if rep >= 0:
                    times[mode].append(time.perf_counter() - t0)
                assert info["grads"] == mode, info
                kernels[mode], chunk = K, (info["chunk"] if mode == "vmap" else chunk)
    err = float((kernels["vmap"] - kernels["loop"]).abs().max() / kernels["loop"].abs().max())
    tol = 1e-5 if args.method == "exact" else 1e-2      # fp32 gradients; fd also differences fp32 forwards
    assert err < tol, f"batched and loop kernels differ: {err:.2e}"
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = med["loop"] / med["vmap"]
    speedup_min = min(times["loop"]) / min(times["vmap"])   # the least-disturbed repetition of each
    numel = sum(p.numel() for p in params)
    print(f"µP MLP width {args.width} ({numel} params), {args.points} points, {args.method}, "
          f"threads {torch.get_num_threads()}, chunk {chunk}")
    for k in ("loop", "vmap"):
        print(f"{k:5s}: median {med[k]:.3f} s over {args.reps} ({', '.join(f'{t:.3f}' for t in times[k])}), "
              f"{args.points / med[k]:.1f} points/s")
    print(f"speedup batched/loop: {speedup:.2f}x of medians, {speedup_min:.2f}x of minima "
          f"(max relative kernel difference {err:.1e})")
    row = {"machine": platform.node() or platform.machine(), "commit": git_commit(), "width": args.width,
           "params": numel, "points": args.points, "method": args.method, "threads": torch.get_num_threads(),
           "chunk": chunk, "t_loop_s": f"{med['loop']:.3f}", "t_vmap_s": f"{med['vmap']:.3f}",
           "speedup": f"{speedup:.3f}", "speedup_of_minima": f"{speedup_min:.3f}"}
    new = not Path(args.csv).exists()
    with open(args.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
