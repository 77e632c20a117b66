"""Cost of the in-loop statistics: the same training steps with the Monitor on and off, one run.

    .venv/bin/python bench/bench_stats.py --config configs/demo.yaml [--steps 100] [--set k=v ...]

Two identical sweeps (same widths, seeds, data) are built; every step each sweep trains on the
same batch, alternating, so load from other processes hits both sides alike. The "on" side runs
inside `Monitor.training` and calls `Monitor.evaluate` at the config's cadence (stats.every and
the final step: signatures, preactivation moments and histograms, kernels, and the final
sharpness and eNTK), exactly what the loop does. Reported:
    overhead = (t_on - t_off) / t_off, with t = wall seconds of all training steps (+ evals on "on")
    tokens/s = steps * tokens_per_step * models / t
A row is appended to bench/results_stats.csv with the machine and the git commit.
"""
from __future__ import annotations

import argparse
import csv
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastwidth.config import load_config, resolve  # noqa: E402
from fastwidth.data import build_stream  # noqa: E402
from fastwidth.kernels import dispatch  # noqa: E402
from fastwidth.param.optim import set_lr  # noqa: E402
from fastwidth.stats.monitor import Monitor  # noqa: E402
from fastwidth.trainer.loop import make_members, pick_device, tokens_per_step  # noqa: E402


class NullWriter:
    def __init__(self):
        self.rows = 0

    def write(self, row):
        self.rows += 1


def step(m, x, y, cfg, ctx=None):
    set_lr(m.optimizer, cfg.optim, m.step, cfg.train.steps)
    if ctx is None:
        loss = m.model.loss(x, y)
    else:
        with ctx:
            loss = m.model.loss(x, y)
    loss.backward()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(m.model.parameters(), cfg.optim.grad_clip)
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=True)
    m.step += 1


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--set", dest="overrides", nargs="*", default=[])
    ap.add_argument("--csv", default=str(ROOT / "bench" / "results_stats.csv"))
    args = ap.parse_args(argv)
    cfg = resolve(load_config(args.config, [f"train.steps={args.steps}", *args.overrides]))
    device = pick_device(cfg.train.device)
    dispatch.set_backend(cfg.train.kernels)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    stream = build_stream(cfg.data)
    off, on = make_members(cfg, stream, device), make_members(cfg, stream, device)
    tps = tokens_per_step(stream, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        writer = NullWriter()
        def train_batch(step):  # the sharpness rows' batch: the one the members trained on
            b = stream.batch(step)
            return b["x"].to(device), b["y"].to(device)
        mon = Monitor(cfg, Path(tmp), on, stream.probe(), writer, device, train_batch=train_batch)
        t_off = t_on = t_eval = 0.0
        t0 = time.perf_counter()
        mon.evaluate(0, 0)
        t_eval += time.perf_counter() - t0
        for s in range(cfg.train.steps):
            b = stream.batch(s)
            x, y = b["x"].to(device), b["y"].to(device)
            t0 = time.perf_counter()
            for m in off:
                step(m, x, y, cfg)
            sync(device)
            t1 = time.perf_counter()
            for m in on:
                step(m, x, y, cfg, mon.training(m))
            sync(device)
            t2 = time.perf_counter()
            if (s + 1) % cfg.stats.every == 0 or s + 1 == cfg.train.steps:
                mon.evaluate(s + 1, (s + 1) * tps)
            sync(device)
            t3 = time.perf_counter()
            t_off, t_on, t_eval = t_off + (t1 - t0), t_on + (t2 - t1), t_eval + (t3 - t2)
        sig_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*.safetensors"))
    total_on = t_on + t_eval
    n_models = len(on)
    ratio = total_on / t_off
    print(f"models {n_models}  steps {cfg.train.steps}  stats.every {cfg.stats.every}  device {device}")
    print(f"off: {t_off:8.2f} s  {cfg.train.steps * tps * n_models / t_off:10.0f} tokens/s")
    print(f"on:  {total_on:8.2f} s  {cfg.train.steps * tps * n_models / total_on:10.0f} tokens/s "
          f"(steps with hooks {t_on:.2f} s + evaluations {t_eval:.2f} s)")
    print(f"overhead: hooks {t_on / t_off - 1:+.2%}, evaluations {t_eval / t_off:+.2%}, total {ratio - 1:+.2%}; "
          f"{writer.rows} rows, signatures {sig_bytes / 1e6:.1f} MB")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or "uncommitted"
    except OSError:
        commit = "unknown"
    new = not Path(args.csv).exists()
    with open(args.csv, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["machine", "commit", "config", "overrides", "device", "models", "steps", "every",
                        "t_off_s", "t_hooks_s", "t_eval_s", "overhead", "signature_mb"])
        w.writerow([platform.node() or platform.machine(), commit, Path(args.config).name, " ".join(args.overrides),
                    str(device), n_models, cfg.train.steps, cfg.stats.every, f"{t_off:.3f}", f"{t_on:.3f}",
                    f"{t_eval:.3f}", f"{ratio - 1:.4f}", f"{sig_bytes / 1e6:.2f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
