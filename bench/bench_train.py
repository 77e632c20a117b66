"""CPU training throughput: the demo's width sweep in lock-step vs one model at a time.

    python bench/bench_train.py [--steps 20] [--repeats 2] [--config configs/demo.yaml]

Each mode runs in its own subprocess (so its peak RSS is its own), alternating A B A B to cancel
drift on a shared machine. Rate formula: tokens/s = models × steps × batch_size × seq_len / wall
seconds of the training loop (the "run" row's wall_s, stream construction excluded). Rows are
appended to bench/results.csv with the machine, commit and shape; a markdown table is printed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "bench" / "results.csv"


def one_run(config: str, mode: str, steps: int, extra: list[str]) -> dict:
    """Child process: train and report loop wall time and peak RSS."""
    sys.path.insert(0, str(ROOT))
    from fastwidth.config import load_config
    from fastwidth.trainer.loop import run
    from fastwidth.run.metrics import read_metrics
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [f"sweep.mode={mode}", f"train.steps={steps}", "stats.enabled=false",
                                   "train.progress=false", f"train.out_dir={tmp}/run", *extra])
        run_dir = run(cfg)
        row = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "run"][-1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"wall_s": row["wall_s"], "models": row["models"], "peak_bytes": peak,
            "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", dest="extra", nargs="*", default=[])
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(args.config, args.child, args.steps, args.extra)))
        return 0
    results = {"lockstep": [], "sequential": []}
    for r in range(args.repeats):
        for mode in ("lockstep", "sequential"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--config", args.config,
                                  "--steps", str(args.steps), "--set", *args.extra], capture_output=True,
                                 text=True, check=True, cwd=ROOT)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res["tokens_per_s"] = res["models"] * args.steps * res["tokens_per_step"] / res["wall_s"]
            results[mode].append(res)
            print(f"repeat {r} {mode:10s} {res['tokens_per_s']:9.0f} tokens/s  peak {res['peak_bytes'] / 2**20:.0f} MiB",
                  file=sys.stderr)
    med = {m: statistics.median(x["tokens_per_s"] for x in v) for m, v in results.items()}
    peak = {m: max(x["peak_bytes"] for x in v) for m, v in results.items()}
    ratio = med["lockstep"] / med["sequential"]
    machine = f"{platform.machine()} {os.cpu_count()} cores"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    new = not CSV.exists()
    with open(CSV, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["time", "bench", "machine", "commit", "shape", "metric", "value", "baseline", "ratio"])
        shape = f"{args.config} steps={args.steps} {' '.join(args.extra)}".strip()
        w.writerow([stamp, "train_step", machine, git_commit(), shape, "tokens_per_s_lockstep",
                    f"{med['lockstep']:.0f}", f"{med['sequential']:.0f}", f"{ratio:.3f}"])
        w.writerow([stamp, "train_step", machine, git_commit(), shape, "peak_rss_mib_lockstep",
                    f"{peak['lockstep'] / 2**20:.0f}", f"{peak['sequential'] / 2**20:.0f}",
                    f"{peak['lockstep'] / peak['sequential']:.3f}"])
    print("| mode | tokens/s (median) | peak RSS |\n|---|---|---|")
    for m in ("lockstep", "sequential"):
        print(f"| {m} | {med[m]:.0f} | {peak[m] / 2**20:.0f} MiB |")
    print(f"\nlock-step / one-at-a-time throughput: {ratio:.3f}x ({machine}, commit {git_commit()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
