"""The native C++ ops (csrc/) against torch on this CPU, and the demo's training speed with each.

    .venv/bin/python bench/bench_native.py [--reps 7] [--demo-steps 12] [--only ops|ce|demo|profile]

ops:     each op forward+backward (moments: forward) at the demo's shapes, native vs torch.
ce:      readout + cross-entropy at vocabulary 50,257, forward+backward, native vs eager
         F.linear + F.cross_entropy: seconds, and the extra memory (peak RSS above the inputs,
         each side in a fresh process so neither sees the other's freed pages).
demo:    training steps/s of the demo sweep (configs/demo.yaml, all 10 models, statistics hooks
         off) with kernels=native and kernels=torch, both sides built from the same seeds and
         fed the same batches; the losses of the two sides are compared at the end.
profile: torch.profiler over --demo-steps steps of each side: self CPU time by op category.
Speed ratios come from one run with the two sides alternating (native, torch, native, ...),
each timed --reps times; the medians are compared, so load from other processes hits both
alike. Rows are appended to bench/results.csv with the machine and the git commit.
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
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastwidth.kernels import dispatch, native, norm, readout_ce, rope, stats  # noqa: E402
from fastwidth.nn.attention import rope_tables  # noqa: E402

CSV = ROOT / "bench" / "results.csv"
VOCAB = 50257


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores"


def append_rows(rows: list[dict]) -> None:
    keys = ["time", "bench", "machine", "commit", "shape", "metric", "value", "baseline", "ratio"]
    new = not CSV.exists()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(CSV, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({"time": stamp, "machine": machine(), "commit": commit(), **r})


def alternate(fast, base, reps: int) -> tuple[float, float]:
    """Median seconds of fast() and base(), called in turn reps times after one warm-up each."""
    fast(), base()
    tf, tb = [], []
    for _ in range(reps):
        for fn, ts in ((fast, tf), (base, tb)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(tf), statistics.median(tb)


def row(bench: str, shape: str, metric: str, value: float, baseline: float, lower_is_better=True) -> dict:
    ratio = baseline / value if lower_is_better else value / baseline
    print(f"{bench:14s} {shape:34s} {metric:18s} native {value:10.4g}  torch {baseline:10.4g}  "
          f"{'speed-up' if metric.endswith('_s') else 'ratio'} {ratio:6.2f}x")
    return {"bench": bench, "shape": shape, "metric": metric, "value": f"{value:.6g}",
            "baseline": f"{baseline:.6g}", "ratio": f"{ratio:.3f}"}


# ---------------------------------------------------------------- single ops


def fwd_bwd(fn, *inputs):
    def run():
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        loss = sum(o.float().sum() for o in out if o.requires_grad)
        torch.autograd.grad(loss, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad])
    return run


def bench_ops(reps: int) -> list[dict]:
    from fastwidth.stats.moments import batch_moments_fused, batch_moments_torch
    rows = []
    x = torch.randn(16 * 64, 2048)  # the demo's widest mlp.fc preactivation: 2M elements
    tn, tt = alternate(lambda: batch_moments_fused(x, 64, -8.0, 8.0, backend="native", hist_stride=16),
                       lambda: batch_moments_torch(x, 64, -8.0, 8.0, hist_stride=16), reps)
    rows.append(row("moments", "2M fp32 hist_stride 16 (stats)", "fwd_s", tn, tt))
    tn, tt = alternate(lambda: stats.moments_histogram(x, -8.0, 8.0, 64, backend="native"),
                       lambda: stats.moments_histogram_ref(x, -8.0, 8.0, 64), reps)
    rows.append(row("moments", "2M fp32 vs moments_histogram_ref", "fwd_s", tn, tt))
    h, r = torch.randn(16, 64, 512, requires_grad=True), torch.randn(16, 64, 512, requires_grad=True)
    w, b = torch.randn(512, requires_grad=True), torch.randn(512, requires_grad=True)
    for name, fn, args in (("rms_norm", norm.rms_norm, (h, w)),
                           ("rms_norm_res", norm.rms_norm_residual, (h, r, w)),
                           ("layer_norm_res", norm.layer_norm_residual, (h, r, w, b))):
        tn, tt = alternate(fwd_bwd(lambda *a: fn(*a, backend="native"), *args),
                           fwd_bwd(lambda *a: fn(*a, backend="torch"), *args), reps)
        rows.append(row(name, "(16, 64, 512) fp32", "fwd_bwd_s", tn, tt))
    q = torch.randn(16, 64, 32, 16).transpose(1, 2).requires_grad_()  # (B, H, T, D) view, as in the GPT
    cos, sin = rope_tables(64, 16, 10000.0)
    tn, tt = alternate(fwd_bwd(lambda a: rope.rope(a, cos, sin, backend="native"), q),
                       fwd_bwd(lambda a: rope.rope(a, cos, sin, backend="torch"), q), reps)
    rows.append(row("rope", "(16, 32, 64, 16) fp32 view", "fwd_bwd_s", tn, tt))
    return rows


# ---------------------------------------------------------------- readout cross-entropy


def ce_inputs(M: int, N: int):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(M, N, generator=g).requires_grad_()
    w = (torch.randn(VOCAB, N, generator=g) / N ** 0.5).requires_grad_()
    t = torch.randint(0, VOCAB, (M,), generator=g)
    return h, w, t


def ce_step(kind: str, h, w, t):
    if kind == "native":
        loss = readout_ce.readout_cross_entropy(h, w, t, backend="native")
    else:
        loss = F.cross_entropy(F.linear(h, w), t)
    loss.backward()
    return loss


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def ce_memory_child(kind: str, M: int, N: int) -> None:
    """Print the peak RSS (MiB) above the inputs of one forward+backward (run in a fresh process)."""
    native.load()
    small = ce_inputs(8, N)
    ce_step(kind, *small)  # thread pools, BLAS buffers: not the op's memory
    h, w, t = ce_inputs(M, N)
    base = _rss_kib("VmRSS")
    ce_step(kind, h, w, t)
    print((_rss_kib("VmHWM") - base) / 1024)


def ce_memory(kind: str, M: int, N: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--ce-memory-child", kind, str(M), str(N)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return float(out.stdout.split()[-1])


def bench_ce(reps: int, M: int, N: int) -> list[dict]:
    h, w, t = ce_inputs(M, N)

    def side(kind):
        def run():
            h.grad = w.grad = None
            ce_step(kind, h, w, t)
        return run

    shape = f"M={M} N={N} V={VOCAB} fp32"
    tn, tt = alternate(side("native"), side("eager"), reps)
    rows = [row("readout_ce", shape, "fwd_bwd_s", tn, tt)]
    mn, mt = ce_memory("native", M, N), ce_memory("eager", M, N)
    rows.append(row("readout_ce", shape, "extra_mib", mn, mt))
    return rows


# ---------------------------------------------------------------- the demo


def demo_sides(steps: int):
    from fastwidth.config import load_config, resolve
    from fastwidth.data import build_stream
    from fastwidth.trainer.loop import make_members
    cfg = resolve(load_config(str(ROOT / "configs" / "demo.yaml"), [f"train.steps={steps}"]))
    stream = build_stream(cfg.data)
    dev = torch.device("cpu")
    return cfg, stream, {"native": make_members(cfg, stream, dev), "torch": make_members(cfg, stream, dev)}


def train_step(members, x, y, cfg, backend: str) -> list[float]:
    from fastwidth.param.optim import set_lr
    dispatch.set_backend(backend)
    losses = []
    for m in members:
        set_lr(m.optimizer, cfg.optim, m.step, cfg.train.steps)
        loss = m.model.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.model.parameters(), cfg.optim.grad_clip)
        m.optimizer.step()
        m.optimizer.zero_grad(set_to_none=True)
        m.step += 1
        losses.append(loss.item())
    return losses


def bench_demo(steps: int) -> list[dict]:
    cfg, stream, sides = demo_sides(steps)
    times = {"native": [], "torch": []}
    losses = {"native": [], "torch": []}
    try:
        for s in range(steps):
            b = stream.batch(s)
            for name in ("native", "torch") if s % 2 == 0 else ("torch", "native"):
                t0 = time.perf_counter()
                losses[name].append(train_step(sides[name], b["x"], b["y"], cfg, name))
                times[name].append(time.perf_counter() - t0)
    finally:
        dispatch.set_backend("auto")
    diff = max(abs(a - c) for la, lc in zip(losses["native"], losses["torch"]) for a, c in zip(la, lc))
    print(f"demo: {steps} steps x {len(sides['torch'])} models; max |loss native - loss torch| = {diff:.2e}")
    tn, tt = statistics.median(times["native"][1:]), statistics.median(times["torch"][1:])
    shape = f"configs/demo.yaml {len(sides['torch'])} models steps={steps}"
    return [row("demo_step", shape, "steps_per_s", 1 / tn, 1 / tt, lower_is_better=False)]


CATEGORIES = (
    ("gemm", ("mm", "addmm", "bmm", "linear", "matmul", "baddbmm")),
    ("attention", ("scaled_dot_product", "_flash_attention", "attention")),
    ("native", ("fastwidth_native",)),
    ("optimizer", ("_foreach", "adam", "lerp", "sqrt_", "addcmul", "addcdiv")),
    ("elementwise", ("mul", "add", "sum", "pow", "cat", "copy", "sub", "div", "rsqrt", "mean", "neg", "exp",
                     "tanh", "log", "where", "clone", "fill", "zero", "clamp", "max", "gather", "softmax",
                     "embedding", "index", "norm", "gelu", "erf", "slice", "to", "empty", "cross_entropy")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_demo(steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile
    cfg, stream, sides = demo_sides(steps + 1)
    batches = [stream.batch(s) for s in range(steps + 1)]
    for name in ("torch", "native"):
        train_step(sides[name], batches[0]["x"], batches[0]["y"], cfg, name)  # warm-up outside the trace
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches[1:]:
                train_step(sides[name], b["x"], b["y"], cfg, name)
        by_cat: dict[str, float] = {}
        by_op: dict[str, float] = {}
        for ev in prof.key_averages():
            if ev.self_cpu_time_total <= 0:
                continue
            by_cat[category(ev.key)] = by_cat.get(category(ev.key), 0.0) + ev.self_cpu_time_total
            by_op[ev.key] = by_op.get(ev.key, 0.0) + ev.self_cpu_time_total
        total = sum(by_cat.values())
        print(f"profile kernels={name}: {steps} demo steps, self CPU {total / 1e6:.2f} s")
        print("  " + ", ".join(f"{c} {v / total:.0%}" for c, v in sorted(by_cat.items(), key=lambda kv: -kv[1])))
        top = sorted(by_op.items(), key=lambda kv: -kv[1])[:10]
        print("  top ops: " + ", ".join(f"{k} {v / total:.1%}" for k, v in top))
    dispatch.set_backend("auto")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--demo-steps", type=int, default=12)
    ap.add_argument("--ce-rows", type=int, default=2048)
    ap.add_argument("--ce-width", type=int, default=256)
    ap.add_argument("--only", choices=["ops", "ce", "demo", "profile"], default=None)
    ap.add_argument("--no-csv", action="store_true", help="print only")
    ap.add_argument("--ce-memory-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ce_memory_child:
        kind, M, N = args.ce_memory_child
        ce_memory_child(kind, int(M), int(N))
        return 0
    native.load()
    print(f"{machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} (other processes share these cores)")
    rows = []
    if args.only in (None, "ops"):
        rows += bench_ops(args.reps)
    if args.only in (None, "ce"):
        rows += bench_ce(args.reps, args.ce_rows, args.ce_width)
    if args.only in (None, "demo"):
        rows += bench_demo(args.demo_steps)
    if args.only == "profile":
        profile_demo(args.demo_steps)
    if rows and not args.no_csv:
        append_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
