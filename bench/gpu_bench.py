"""GPU benchmark of fastwidth's kernels against torch eager, torch.compile, SDPA and friends.

    python bench/gpu_bench.py                # GPU tests, then every benchmark
    python bench/gpu_bench.py --skip-tests --only attention,readout_ce --quick

Installs nothing; optional baselines (flash-attn, Liger-Kernel, torch's linear_cross_entropy,
cuDNN SDPA) are skipped with a line saying so. Each case reports ms, a rate whose formula is
in `flops_*` / `bytes_*` below, and peak memory over the call; rows are appended to
bench/results.csv (GPU, commit, torch, triton, shape) and a markdown table and the target
checks of issue 5 are printed at the end.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastwidth.kernels import act, attention, dispatch, norm, readout_ce, stats  # noqa: E402

# dense bf16 peak of an H200 SXM (the H100's Hopper tensor cores), NVIDIA datasheet
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
ROWS: list[dict] = []
NOTES: list[str] = []


# ---------------------------------------------------------------- measurement


def timed(fn, warmup: int = 3, reps: int = 10) -> tuple[float, float]:
    """Median ms of fn() over reps (CUDA events), and peak MiB allocated above the start."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return sorted(times)[len(times) // 2], peak


def record(case: str, shape: str, impl: str, fn, work: float, unit: str, baseline: str | None = None):
    """Time fn and store a row; work is FLOPs (unit TFLOP/s) or bytes (unit GB/s)."""
    try:
        ms, peak = timed(fn)
    except Exception as e:  # a baseline that cannot run this shape is reported, not fatal
        NOTES.append(f"{case} {impl}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return
    rate = work / (ms * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
    ROWS.append(dict(case=case, shape=shape, impl=impl, ms=round(ms, 4), rate=round(rate, 2), unit=unit,
                     peak_mib=round(peak, 1), baseline=baseline or ""))


def fwd_bwd(f, inputs, grad=None):
    def run():
        for t in inputs:
            t.grad = None
        out = f()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad if grad is not None and out.dim() else None)
    return run


def leaf(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device="cuda", dtype=torch.float32) * scale).to(dtype).requires_grad_(True)


# ---------------------------------------------------------------- cases


def flops_attention(B, H, T, D, causal):
    # forward 2 GEMMs of 2*T*T*D each per head; backward 2.5x forward (FlashAttention-2 paper)
    fwd = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
    return 3.5 * fwd


def bench_attention(quick: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, H, D = 2, 16, 128
    for T in ([2048] if quick else [2048, 4096, 8192]):
        q, k, v = leaf(B, H, T, D), leaf(B, H, T, D), leaf(B, H, T, D)
        do = torch.randn_like(q)
        shape = f"B{B} H{H} T{T} D{D} causal bf16"
        work = flops_attention(B, H, T, D, True)
        sc = 1.0 / D
        record("attention", shape, "triton", fwd_bwd(lambda: attention.attention(q, k, v, scale=sc, backend="triton"),
                                                     [q, k, v], do), work, "TFLOP/s", "sdpa_flash")
        for name, be in [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]:
            def run(be=be):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sc)
            record("attention", shape, name, fwd_bwd(run, [q, k, v], do), work, "TFLOP/s")
        if attention.flash_available():
            record("attention", shape, "flash_attn", fwd_bwd(
                lambda: attention.attention(q, k, v, scale=sc, backend="flash"), [q, k, v], do), work, "TFLOP/s")
        elif T == 2048:
            NOTES.append("flash-attn not importable: flash_attn baseline skipped")


def flops_readout(M, N, V):
    return 6 * M * N * V  # logits GEMM + dh GEMM + dW GEMM


def bench_readout_ce(quick: bool):
    M, N, V = (4096 if quick else 8192), 1024, 50304
    h, w = leaf(M, N), leaf(V, N, scale=0.02)
    t = torch.randint(0, V, (M,), device="cuda")
    shape = f"M{M} N{N} V{V} bf16"
    work = flops_readout(M, N, V)
    mult = 0.5

    def eager():
        return F.cross_entropy((F.linear(h, w) * mult).float(), t)
    record("readout_ce", shape, "eager", fwd_bwd(eager, [h, w]), work, "TFLOP/s")
    record("readout_ce", shape, "triton", fwd_bwd(
        lambda: readout_ce.readout_cross_entropy(h, w, t, multiplier=mult, backend="triton"), [h, w]),
        work, "TFLOP/s", "eager")
    comp = torch.compile(eager)
    record("readout_ce", shape, "torch.compile", fwd_bwd(comp, [h, w]), work, "TFLOP/s")
    lce = getattr(F, "linear_cross_entropy", None)
    if lce is not None:
        record("readout_ce", shape, "torch.linear_cross_entropy", fwd_bwd(lambda: lce(h * mult, w, t), [h, w]),
               work, "TFLOP/s")
    else:
        NOTES.append(f"torch {torch.__version__} has no F.linear_cross_entropy: baseline skipped")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger
        record("readout_ce", shape, "liger", fwd_bwd(lambda: liger(h * mult, w, t), [h, w]), work, "TFLOP/s")
    except ImportError:
        NOTES.append("liger-kernel not importable: Liger baseline skipped")


def bytes_norm(M, N, elem, residual):
    # fwd reads x (+ residual), writes y (+ s); bwd reads dy (+ ds), s, writes dx
    fwd = M * N * elem * (2 + 2 * residual)
    bwd = M * N * elem * (3 + residual)
    return fwd + bwd


def bench_norm(quick: bool):
    M, N = (8192 if quick else 16384), 4096
    x, r, w, b = leaf(M, N), leaf(M, N), leaf(N), leaf(N)
    dy = torch.randn_like(x)
    for kind, is_rms in (("rms_norm", True), ("layer_norm", False)):
        bb = None if is_rms else b
        for residual in (False, True):
            rr = r if residual else None
            shape = f"M{M} N{N} bf16 residual={residual}"
            work = bytes_norm(M, N, 2, residual)
            ins = [x, w] + ([r] if residual else []) + ([] if is_rms else [b])
            ref = lambda rr=rr, bb=bb: norm.norm_ref(x, rr, w, bb, 1e-5, is_rms)[0]  # noqa: E731
            record(kind, shape, "eager", fwd_bwd(ref, ins, dy), work, "GB/s")
            record(kind, shape, "torch.compile", fwd_bwd(torch.compile(ref), ins, dy), work, "GB/s")
            record(kind, shape, "triton", fwd_bwd(lambda rr=rr, bb=bb: norm._norm(x, rr, w, bb, 1e-5, is_rms,
                                                                                  "triton")[0], ins, dy),
                   work, "GB/s", "eager")


def bench_act(quick: bool):
    M, N = (8192 if quick else 16384), 8192
    x, u = leaf(M, N), leaf(M, N)
    dy = torch.randn_like(x)
    shape = f"M{M} N{N} bf16"
    # gelu: fwd reads x writes y, bwd reads x, dy writes dx; swiglu: fwd 2 in 1 out, bwd 3 in 2 out
    for name, ref, fast, ins, nbytes in [
        ("gelu", lambda: act.gelu_ref(x), lambda: act.gelu(x, backend="triton"), [x], 5 * M * N * 2),
        ("swiglu", lambda: act.swiglu_ref(x, u), lambda: act.swiglu(x, u, backend="triton"), [x, u], 8 * M * N * 2),
    ]:
        record(name, shape, "eager", fwd_bwd(ref, ins, dy), nbytes, "GB/s")
        record(name, shape, "torch.compile", fwd_bwd(torch.compile(ref), ins, dy), nbytes, "GB/s")
        record(name, shape, "triton", fwd_bwd(fast, ins, dy), nbytes, "GB/s", "eager")


def bench_stats(quick: bool):
    n = 1 << (26 if quick else 28)
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    shape = f"n{n} bf16 bins100"
    record("moments_hist", shape, "torch", lambda: stats.moments_histogram_ref(x, -4, 4, 100), 2 * n, "GB/s")
    record("moments_hist", shape, "triton", lambda: stats.moments_histogram(x, -4, 4, 100, backend="triton"),
           2 * n, "GB/s", "torch")
    f = torch.randn(4096, 8192, device="cuda", dtype=torch.bfloat16)
    work = 2 * 4096 * 4096 * 8192
    record("gram", "P4096 N8192 bf16", "torch", lambda: stats.gram_ref(f), work, "TFLOP/s")
    record("gram", "P4096 N8192 bf16", "triton", lambda: stats.gram(f, backend="triton"), work, "TFLOP/s", "torch")


def bench_gpt_step(quick: bool):
    from fastwidth.config import Config
    from fastwidth.models import build_model
    cfg = Config()
    cfg.model.arch, cfg.model.width, cfg.model.depth, cfg.model.head_dim = "gpt", 1024, (4 if quick else 12), 128
    B, T, V = 8, 1024, 50304
    io = SimpleNamespace(kind="tokens", vocab_size=V, seq_len=T)
    x = torch.randint(0, V, (B, T + 1), device="cuda")
    for impl, backend, compiled in [("eager", "torch", False), ("torch.compile", "torch", True),
                                    ("kernels", "triton", False), ("kernels+compile", "triton", True)]:
        dispatch.set_backend(backend)
        model, _ = build_model(cfg, io, device="cuda", seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        loss_fn = torch.compile(model.loss) if compiled else model.loss
        n_params = sum(p.numel() for n, p in model.named_parameters() if "emb" not in n)
        L, d = cfg.model.depth, cfg.model.width
        # model FLOPs a token: 6 N (matmuls fwd+bwd) + 12 L T d (attention scores and values, PaLM appendix B)
        flops = B * T * (6 * n_params + 12 * L * T * d)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        shape = f"gpt w{d} L{L} B{B} T{T} V{V} bf16-autocast"
        record("gpt_step", shape, impl, step, flops, "TFLOP/s", "eager" if impl.startswith("kernels") else None)
        del model, opt
        torch.cuda.empty_cache()
    dispatch.set_backend("auto")
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    for r in ROWS:
        if r["case"] == "gpt_step":
            ms = r["ms"]
            r["tokens_per_s"] = round(B * T / (ms * 1e-3))
            r["mfu"] = round(r["rate"] * 1e12 / peak, 3) if peak else ""


# ---------------------------------------------------------------- report


def ratio(case, impl, base, key="ms", shape=None):
    rows = {(r["shape"], r["impl"]): r for r in ROWS if r["case"] == case}
    out = []
    for (sh, im), r in rows.items():
        if im == impl and (sh, base) in rows and (shape is None or shape in sh):
            b = rows[(sh, base)]
            out.append((sh, b[key] / r[key] if key == "ms" else r[key] / max(b[key], 1e-9)))
    return out


def targets() -> list[str]:
    lines = []

    def check(label, pairs, ok):
        for sh, v in pairs:
            lines.append(f"| {label} | {sh} | {v:.2f}x | {'PASS' if ok(v) else 'FAIL'} |")
        if not pairs:
            lines.append(f"| {label} | - | not measured | SKIP |")
    check("attention fwd+bwd vs sdpa_flash (>= 0.9x speed)", ratio("attention", "triton", "sdpa_flash"), lambda v: v >= 0.9)
    check("readout_ce speed vs eager (>= 1.0x)", ratio("readout_ce", "triton", "eager"), lambda v: v >= 1.0)
    check("readout_ce peak memory / eager (<= 0.25)", ratio("readout_ce", "triton", "eager", key="peak_mib"),
          lambda v: v <= 0.25)
    for case in ("rms_norm", "layer_norm", "gelu", "swiglu"):
        check(f"{case} speed vs eager (>= 1.5x)", ratio(case, "triton", "eager"), lambda v: v >= 1.5)
    check("gpt step kernels vs eager (> 1x)", ratio("gpt_step", "kernels", "eager"), lambda v: v > 1.0)
    check("gpt step kernels vs torch.compile (> 1x)", ratio("gpt_step", "kernels", "torch.compile"), lambda v: v > 1.0)
    return lines


def write_csv(path: Path):
    meta = dict(time=datetime.datetime.utcnow().isoformat(timespec="seconds"), gpu=torch.cuda.get_device_name(),
                commit=_commit(), torch=torch.__version__, triton=_triton_version())
    fields = ["time", "gpu", "commit", "torch", "triton", "case", "shape", "impl", "ms", "rate", "unit",
              "peak_mib", "baseline", "tokens_per_s", "mfu"]
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in ROWS:
            w.writerow({**meta, **r})


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "absent"


def print_table():
    print("\n| case | shape | impl | ms | rate | peak MiB | tokens/s | MFU |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in ROWS:
        print(f"| {r['case']} | {r['shape']} | {r['impl']} | {r['ms']:.3f} | {r['rate']} {r['unit']} | "
              f"{r['peak_mib']} | {r.get('tokens_per_s', '')} | {r.get('mfu', '')} |")
    print("\n| target | shape | measured | verdict |\n|---|---|---:|---|")
    print("\n".join(targets()))
    for n in NOTES:
        print(f"- {n}")


CASES = dict(attention=bench_attention, readout_ce=bench_readout_ce, norm=bench_norm, act=bench_act,
             stats=bench_stats, gpt_step=bench_gpt_step)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-tests", action="store_true", help="do not run the GPU tests first")
    ap.add_argument("--only", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    ap.add_argument("--csv", default=str(ROOT / "bench" / "results.csv"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; nothing to benchmark (the CPU tests are `pytest tests/kernels`)")
        return 2
    rc = 0
    if not args.skip_tests:
        t0 = time.time()
        rc = subprocess.call([sys.executable, "-m", "pytest", "-x", "-q", "tests/kernels/test_kernel_gpu.py"], cwd=ROOT)
        print(f"GPU tests: {'passed' if rc == 0 else 'FAILED'} in {time.time() - t0:.0f} s")
    for name in args.only.split(","):
        if name not in CASES:
            print(f"gpu_bench: unknown case {name!r}; valid: {', '.join(CASES)}")
            return 2
        t0 = time.time()
        try:
            CASES[name](args.quick)
        except Exception as e:
            NOTES.append(f"{name}: aborted ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
        torch.cuda.empty_cache()
    write_csv(Path(args.csv))
    print_table()
    print(f"\nrows appended to {args.csv}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
