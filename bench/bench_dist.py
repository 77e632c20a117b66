"""Step time of 2 CPU ranks vs 1 for each backend (same global batch), as a ratio.

    python bench/bench_dist.py [--steps 30] [--csv bench/results.csv]

ratio = (wall seconds per step on 2 ranks) / (wall seconds per step on 1 process, backend none);
wall per step = the run row's wall_s / train.steps. On 2 cores each rank does half the work
but pays gloo collectives; < 1 means data parallelism helps. Rows append to the CSV with the
machine and commit. GPU (widest GPT on one H200 with / without ZeRO-3 offload) is planned with
`fastwidth plan`; no GPU run is made here.
"""
import argparse
import csv
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CFG = {"model": {"arch": "gpt", "depth": 2, "head_dim": 16, "width": 256}, "param": {"base_width": 64},
       "data": {"source": "stdlib", "seq_len": 64, "batch_size": 16, "probe_size": 8},
       "train": {"progress": False, "log_every": 10}, "stats": {"enabled": False}}
BACKENDS = {"ddp": ("torchrun", ["dist.backend=ddp"]), "fsdp2": ("torchrun", ["dist.backend=fsdp2"]),
            "zero1": ("deepspeed", ["dist.backend=deepspeed", "dist.zero_stage=1"]),
            "zero2": ("deepspeed", ["dist.backend=deepspeed", "dist.zero_stage=2"]),
            "zero3": ("deepspeed", ["dist.backend=deepspeed", "dist.zero_stage=3"])}


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def step_time(launcher, sets, cfg_file, out, steps):
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={port()}"]
    elif launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port()]
    else:
        cmd = [sys.executable]
    cmd += [str(ROOT / "launch" / "train.py"), "--config", str(cfg_file), "--set", f"train.out_dir={out}",
            f"train.steps={steps}", "train.threads=1", *sets]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=env, timeout=600)
    run = [json.loads(l) for l in open(Path(out) / "metrics.jsonl") if '"kind": "run"' in l][-1]
    return run["wall_s"] / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--csv", default=str(ROOT / "bench" / "results.csv"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    cfg_file = tmp / "bench.yaml"
    cfg_file.write_text(yaml.safe_dump(CFG))
    one = step_time("python", [], cfg_file, tmp / "one", args.steps)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    rows = []
    for name, (launcher, sets) in BACKENDS.items():
        t = step_time(launcher, sets, cfg_file, tmp / name, args.steps)
        rows.append({"bench": "dist_step_ratio", "backend": name, "ranks": 2, "s_per_step": round(t, 4),
                     "s_per_step_1proc": round(one, 4), "ratio": round(t / one, 3), "machine": platform.node(),
                     "cpus": os.cpu_count(), "commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())})
        print(json.dumps(rows[-1]), flush=True)
    # the same columns as bench_train.py's rows in bench/results.csv
    new = not Path(args.csv).exists()
    with open(args.csv, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["time", "bench", "machine", "commit", "shape", "metric", "value", "baseline", "ratio"])
        for r in rows:
            w.writerow([r["time"] + "Z", "dist_step", f"{platform.machine()} {r['cpus']} cores", r["commit"],
                        f"gpt width {CFG['model']['width']} steps={args.steps} {r['backend']} 2 ranks",
                        "s_per_step_2ranks", r["s_per_step"], r["s_per_step_1proc"], r["ratio"]])

if __name__ == "__main__":
    main()
