"""The GPU check: one prepared run of at most 8 minutes on one H200 (or H100).

    python bench/gpu_bench.py --out DIR            # GPU tests, then every timing case
    python bench/gpu_bench.py --out DIR --dry-run  # the same orchestration on the CPU, tiny shapes

Prints its budget and the time each part took. The GPU tests run first (pytest without -x, so
one failure hides nothing), then each timing family in its own subprocess, so that a CUDA fault
in one cannot poison the others, each with a deadline from what is left of the budget: the child
skips what it cannot start before its deadline and writes its rows after every case, so a part
cut short still reports what it measured. Uses only
torch, triton and the repository (transformers and deepspeed are not needed; pyyaml and pytest
are checked and their absence reported). Writes DIR/gpu_results.csv (bench/results.csv's
columns) and DIR/gpu_results.md (every row, the issue's targets as ratios measured in the same
run, alternating each fast path with its baselines, each row beside its baseline, MFU for the
GPT step, and the notes); DIR defaults to bench/. The cases live in bench/cases.py.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGET_S = 480
# planned seconds per part (sum 460, 20 s spare); a part gets min(plan, what is left - spare)
PLAN = {"tests": 150, "attention": 110, "readout_ce": 35, "norm": 30, "act": 25, "gpt_step": 110}
PLAN.update(tests=PLAN["tests"] - 25, linear=25)  # fused µP linear + GELU at d 2048-8192: three shapes, ~1 s each
SPARE_S = 20
DRY_RUN_SCALE = 4.0  # --dry-run: the Triton interpreter on a shared CPU, every deadline 4x
CSV_FIELDS = ["time", "bench", "machine", "commit", "shape", "metric", "value", "baseline", "ratio"]
CHILD_RESERVE = 0.15  # a child stops starting impls when less than this share of its deadline is left


# ---------------------------------------------------------------- the child: one family of cases


def _build(family: str, device: str, dry: bool) -> list:
    from bench import cases as C
    if family == "attention":
        if dry:
            return [C.attention_case(device, T=64, D=16, B=1, H=2)]
        return [C.attention_case(device, T, D) for D in (64, 128) for T in (2048, 4096, 8192)]
    if family == "readout_ce":
        return [C.readout_ce_case(device, M=8, N=32, V=131) if dry else C.readout_ce_case(device)]
    if family == "norm":
        # 4096 columns: one block; 16384: the chunked kernels (norm.CHUNK)
        return C.norm_cases(device, M=8, N=64) if dry else C.norm_cases(device) + C.norm_cases(device, M=4096, N=16384)
    if family == "act":
        return C.act_cases(device, M=8, N=128) if dry else C.act_cases(device)
    if family == "linear":
        return C.linear_cases(device, dims=(32,), M=8) if dry else C.linear_cases(device)
    if family == "gpt_step":
        if dry:
            return [C.gpt_step_case(device, width=32, depth=1, B=1, T=16, V=64, head_dim=16, compile_impls=False)]
        return [C.gpt_step_case(device)]
    raise KeyError(family)


def _time_interleaved(impls: dict, reps: int, warmup: int, cuda: bool) -> dict[str, float]:
    """Median ms per impl, the impls taking turns rep by rep so drifting load hits all alike."""
    import torch
    for fn in impls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list] = {k: [] for k in impls}
    for _ in range(reps):
        for name, fn in impls.items():
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times[name].append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _peak_mib(fn, cuda: bool) -> float:
    if not cuda:
        return 0.0
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"


def run_child(family: str, out: Path, dry: bool, deadline_s: float = float("inf")) -> int:
    """Time every case of `family`, writing out/rows_<family>.json after each case; an impl not
    started while CHILD_RESERVE of the deadline is left, or a case past it, is a note row."""
    import torch
    t0 = time.monotonic()
    left = lambda: deadline_s - (time.monotonic() - t0)  # noqa: E731
    cuda = not dry
    device = "cuda" if cuda else "cpu"
    rows: list[dict] = []
    path = out / f"rows_{family}.json"
    for case in _build(family, device, dry):
        ok = {}
        for name, fn in case.impls.items():  # an impl that cannot run this shape is a note, not fatal
            if left() < CHILD_RESERVE * deadline_s:
                rows.append(dict(case=case.case, shape=case.shape, impl=name, error="skipped: part deadline"))
                continue
            try:
                fn()
                ok[name] = fn
            except Exception as e:
                rows.append(dict(case=case.case, shape=case.shape, impl=name, error=_error(e)))
        reps = 2 if dry else (10 if left() > CHILD_RESERVE * deadline_s else 3)
        ms = _time_interleaved(ok, reps=reps, warmup=0 if dry else 2, cuda=cuda)
        for name, fn in ok.items():
            rate = case.work / (ms[name] * 1e-3) / (1e12 if case.unit == "TFLOP/s" else 1e9)
            rows.append(dict(case=case.case, shape=case.shape, impl=name, ms=ms[name], rate=rate, unit=case.unit,
                             peak_mib=_peak_mib(fn, cuda), baseline=case.baseline, fast=case.fast,
                             targets=case.targets, note=case.note))
        print(f"  {case.case} {case.shape}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()), flush=True)
        path.write_text(json.dumps(rows))
        del case
        if cuda:
            torch.cuda.empty_cache()
    path.write_text(json.dumps(rows))
    return 0


# ---------------------------------------------------------------- the parent: budget and report


class Budget:
    """The run's seconds: each part gets its plan (times `scale`), cut to what is left after the spare."""

    def __init__(self, total: float, scale: float = 1.0, clock=time.monotonic):
        self.total, self.scale, self.clock, self.t0 = total * scale, scale, clock, clock()
        self.parts: list[tuple[str, float, str]] = []

    def left(self) -> float:
        return self.total - (self.clock() - self.t0)

    def deadline(self, part: str) -> float:
        return max(0.0, min(PLAN[part] * self.scale, self.left() - SPARE_S * self.scale))

    def record(self, part: str, seconds: float, status: str) -> None:
        self.parts.append((part, seconds, status))
        print(f"[{part}] {status} in {seconds:.0f} s (planned {PLAN[part] * self.scale:.0f} s; {self.left():.0f} s of the budget left)",
              flush=True)


def run_part(cmd: list[str], timeout: float) -> tuple[int | None, float, str]:
    """Run cmd with a wall-clock limit; (return code or None on timeout, seconds, last output line)."""
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        sys.stdout.write(out)
        return None, time.monotonic() - t0, "timed out"
    sys.stdout.write(p.stdout + p.stderr[-3000:])
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    return p.returncode, time.monotonic() - t0, lines[-1] if lines else ""


def environment() -> tuple[dict, list[str]]:
    """What the run has (versions, GPU) and notes on what it lacks."""
    import torch
    env = dict(torch=torch.__version__, triton="absent", gpu="cpu", python=platform.python_version())
    notes = []
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        notes.append("triton is not importable: every Triton case will fail")
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    for mod, why in (("yaml", "pyyaml (config files)"), ("pytest", "pytest (the GPU tests)"),
                     ("transformers", "transformers (not needed)"), ("deepspeed", "deepspeed (not needed)")):
        if importlib.util.find_spec(mod) is None:
            notes.append(f"{why} is not installed")
    return env, notes


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def _by_impl(rows: list[dict]) -> dict:
    return {(r["case"], r["shape"], r["impl"]): r for r in rows if "ms" in r}


def target_lines(rows: list[dict]) -> list[str]:
    """One markdown row per (target, shape): the ratio measured in this run and PASS/FAIL."""
    idx = _by_impl(rows)
    seen, lines = set(), []
    for r in rows:
        if "ms" not in r or r["impl"] != r["fast"]:
            continue
        for metric, base, op, bound in r["targets"]:
            b = idx.get((r["case"], r["shape"], base))
            key = (r["case"], r["shape"], metric, base)
            if key in seen:
                continue
            seen.add(key)
            if b is None:
                lines.append(f"| {r['case']} {metric} vs {base} {op} {bound} | {r['shape']} | not measured | SKIP |")
                continue
            v = b["ms"] / r["ms"] if metric == "speed" else r["peak_mib"] / max(b["peak_mib"], 1e-9)
            ok = {">=": v >= bound, ">": v > bound, "<=": v <= bound}[op]
            lines.append(f"| {r['case']} {metric} vs {base} {op} {bound} | {r['shape']} | {v:.2f}x | "
                         f"{'PASS' if ok else 'FAIL'} |")
    return lines


def _peak(env: dict) -> float | None:
    from fastwidth.trainer.flops import GPU_PEAK_BF16  # the training loop's MFU uses the same table
    return next((v for k, v in GPU_PEAK_BF16 if k in env["gpu"]), None)


def csv_rows(rows: list[dict], env: dict, when: str, commit: str) -> list[dict]:
    """bench/results.csv's columns: one row per (impl, metric), ratio = value / the baseline's value."""
    idx = _by_impl(rows)
    peak = _peak(env)
    machine = f"{env['gpu']} torch {env['torch']} triton {env['triton']}"
    out = []
    for r in rows:
        if "ms" not in r:
            continue
        b = idx.get((r["case"], r["shape"], r["baseline"]), r)
        metrics = [(r["unit"], r["rate"], b["rate"]), ("peak_mib", r["peak_mib"], b["peak_mib"])]
        if r["case"] == "gpt_step" and peak:
            metrics.append(("mfu", r["rate"] * 1e12 / peak, b["rate"] * 1e12 / peak))
        for name, v, bv in metrics:
            out.append(dict(time=when, bench=f"gpu_{r['case']}", machine=machine, commit=commit, shape=r["shape"],
                            metric=f"{name} {r['impl']} (baseline {r['baseline']})", value=round(v, 4),
                            baseline=round(bv, 4), ratio=round(v / bv, 4) if bv else ""))
    return out


def table_lines(rows: list[dict], peak: float | None) -> list[str]:
    """The one table: every impl beside its case's baseline from the same run (speed-up = the
    baseline's ms / this ms), and MFU (rate over the bf16 peak) for the model-FLOP cases."""
    idx = _by_impl(rows)
    out = ["| case | shape | impl | ms | rate | peak MiB | baseline | baseline ms | speed-up | MFU |",
           "|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if "ms" not in r:
            continue
        b = idx.get((r["case"], r["shape"], r["baseline"]))
        mfu = f"{r['rate'] * 1e12 / peak:.1%}" if peak and r["case"] == "gpt_step" else ""
        out.append(f"| {r['case']} | {r['shape']} | {r['impl']} | {r['ms']:.3f} | {r['rate']:.1f} {r['unit']} | "
                   f"{r['peak_mib']:.0f} | {r['baseline']} | {b['ms']:.3f} | {b['ms'] / r['ms']:.2f}x | {mfu} |"
                   if b else f"| {r['case']} | {r['shape']} | {r['impl']} | {r['ms']:.3f} | {r['rate']:.1f} "
                   f"{r['unit']} | {r['peak_mib']:.0f} | {r['baseline']} | not measured | | {mfu} |")
    return out


def write_report(out: Path, rows: list[dict], env: dict, notes: list[str], budget: Budget) -> None:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with (out / "gpu_results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(csv_rows(rows, env, when, _commit()))
    md = [f"# GPU bench {when}: {env['gpu']}, torch {env['torch']}, triton {env['triton']}", "",
          "| part | seconds | status |", "|---|---:|---|"]
    md += [f"| {p} | {s:.0f} | {st} |" for p, s, st in budget.parts]
    md += ["", *table_lines(rows, _peak(env))]
    notes += [f"{r['case']} {r['shape']} {r['impl']}: {r['error']}" for r in rows if "ms" not in r]
    md += ["", "| target | shape | measured | verdict |", "|---|---|---:|---|", *target_lines(rows), ""]
    md += [f"- {n}" for n in notes + sorted({r['note'] for r in rows if r.get('note')})]
    (out / "gpu_results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench"), help="folder for gpu_results.csv / .md (default bench/)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the orchestration only")
    ap.add_argument("--only", default=",".join(p for p in PLAN if p != "tests"), help="comma list of timing families")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    out = Path(a.out)
    families = [f for f in a.only.split(",") if f]
    bad = [f for f in families if f not in PLAN or f == "tests"]
    if bad:
        print(f"gpu_bench: --only {','.join(bad)} is not valid; families: {', '.join(p for p in PLAN if p != 'tests')}",
              file=sys.stderr)
        return 2
    if a.child:
        return run_child(a.child, out, a.dry_run, a.deadline)
    import torch
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; use --dry-run to check the orchestration on the CPU", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(BUDGET_S, scale=DRY_RUN_SCALE if a.dry_run else 1.0)
    env, notes = environment()
    print(f"gpu_bench: budget {budget.total:.0f} s ({', '.join(f'{k} {v * budget.scale:.0f} s' for k, v in PLAN.items())}, spare {SPARE_S * budget.scale:.0f} s) "
          f"on {env['gpu']}, torch {env['torch']}, triton {env['triton']}", flush=True)
    for n in notes:
        print(f"  note: {n}")
    rc = 0
    if not a.skip_tests and importlib.util.find_spec("pytest") is not None:
        code, secs, last = run_part([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                     "tests/kernels/test_kernel_gpu.py"], budget.deadline("tests"))
        budget.record("tests", secs, last)
        rc = 0 if code == 0 else 1
    rows: list[dict] = []
    for fam in families:
        limit = budget.deadline(fam)
        if limit < 5:
            budget.record(fam, 0, "skipped: budget spent")
            continue
        # the child's own deadline a little inside the parent's kill: it writes what it has first
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", fam, "--out", str(out),
               "--deadline", f"{0.9 * limit:.0f}"]
        code, secs, last = run_part(cmd + (["--dry-run"] if a.dry_run else []), limit)
        f = out / f"rows_{fam}.json"
        got = json.loads(f.read_text()) if f.exists() else []
        f.unlink(missing_ok=True)
        rows += got
        skipped = sum(1 for r in got if r.get("error") == "skipped: part deadline")
        if code == 0 and not skipped:
            budget.record(fam, secs, "ok")
        elif code == 0:
            budget.record(fam, secs, f"partial ({skipped} impls skipped at the deadline)")
        else:
            budget.record(fam, secs, f"failed ({'timeout' if code is None else f'exit {code}'}: {last[:120]}); "
                                     f"{sum('ms' in r for r in got)} rows kept")
            rc = 1
    write_report(out, rows, env, notes, budget)
    return rc


if __name__ == "__main__":
    sys.exit(main())
