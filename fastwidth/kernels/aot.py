"""Ahead-of-time compilation of every Triton kernel for a GPU this machine does not have.

    python -m fastwidth.kernels.aot --arch sm_90 [--json FILE] [--csv FILE] [--family attention,norm] [--jobs N]

Compiles each kernel, for every config its autotuner or launcher can pick at the shapes the
models use (head_dim 64 and 128; bf16, and fp32 where a GPU launch can take fp32; causal and not;
norm widths up to the 32k limit), with triton.compile(ASTSource(...), target=GPUTarget("cuda",
90, 32)): no GPU and no driver are needed. Triton's bundled ptxas -v then reports registers and
spills of the PTX. One row per compilation: {"family", "kernel", "config", "dtype", "compiled",
"shared_bytes", "registers", "spills", "wgmma", "occupancy", "dot", "error"}; spills are ptxas's
spill-store bytes, wgmma says whether a dot lowered to Hopper's warp-group MMA, dot whether the
kernel has a tl.dot at all, occupancy the CTAs an SM can hold (`occupancy`). Exit code 1 (with
one line per failure) when a config does not compile, needs more shared memory than a block may
have, spills a register, does not fit an SM, or (sm_90) has a bf16 dot off wgmma. `make aot`
writes the sm_90 table to bench/aot_sm90.csv; tests/kernels/test_kernel_aot.py gates on it.
A family is a function returning its Specs, registered with @family("name").
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

# Shared memory a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): H100/H200, A100.
SHARED_LIMIT = {90: 232_448, 80: 166_912}
# Per SM (CUDA C Programming Guide, "Technical Specifications per Compute Capability"): shared
# memory (228 KB on sm_90, 164 KB on sm_80), of which 1 KB is reserved per resident block.
SM = {90: dict(shared=233_472, regs=65_536, warps=64, ctas=32),
      80: dict(shared=167_936, regs=65_536, warps=64, ctas=32)}
SHARED_RESERVED = 1024
CSV_FIELDS = ("family", "kernel", "config", "dtype", "registers", "spills", "shared_bytes", "wgmma", "occupancy",
              "dot", "compiled")
FLOAT_ARGS = {"eps", "qk_scale", "scale", "z_coef", "lo", "bin_scale"}
TL_DTYPE = {"bf16": "bf16", "fp32": "fp32"}
NORM_WIDTHS = (1024, 4096, 8192, 16384, 32768)  # model widths up to norm.MAX_N (block_plan chunks > 8k)
HEAD_DIMS = (64, 128)


@dataclass
class Spec:
    """One compilation: kernel `attr` of module `module` with these constexprs and launch options."""

    family: str
    module: str
    attr: str
    dtype: str
    constexprs: dict
    num_warps: int
    num_stages: int = 3
    ptr_types: dict = field(default_factory=dict)  # pointer args not in `dtype`
    int64_args: tuple = ()  # integer args the launcher may pass as 64-bit

    @property
    def kernel(self) -> str:
        return self.attr.lstrip("_")

    def label(self) -> str:
        cs = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items())
        return f"{cs} warps={self.num_warps} stages={self.num_stages}"


# ---------------------------------------------------------------- the configs each launcher can pick

SPECS: dict = {}  # family -> () -> list[Spec], in registration order


def family(name: str):
    """Register a function returning a family's Specs: `@family("linear")` above it is all a new
    family needs."""
    def register(fn):
        SPECS[name] = fn
        return fn
    return register


@family("attention")
def _attention_specs() -> list[Spec]:
    from fastwidth.kernels import attention as A
    mod = "fastwidth.kernels.attention_triton"  # the kernels; their tile tables are attention.py's
    stats = {"lse_ptr": "fp32", "mx_ptr": "fp32", "delta_ptr": "fp32"}
    out = []
    # bf16 only: fp32 on a GPU runs SDPA (attention._kernel_for refuses it), fp16 shares bf16's tiles
    for attr in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        for D in HEAD_DIMS:
            for m, n, warps, stages in A.tile_configs(attr, D):  # every tile the autotuner may pick
                for causal in (True, False):
                    cx = dict(CAUSAL=causal, IEEE=False, UPCAST=False, BLOCK_M=m, BLOCK_N=n, BLOCK_D=D)
                    out.append(Spec("attention", mod, attr, "bf16", cx, warps, stages, stats))
    for dtype in ("bf16",):
        for D in HEAD_DIMS:
            out.append(Spec("attention", mod, "_attn_bwd_delta_kernel", dtype, dict(BLOCK_M=A._DELTA_ROWS, BLOCK_D=D),
                            4, 1, stats))
    return out


@family("readout_ce")
def _readout_specs() -> list[Spec]:
    types = {"t_ptr": "i64", "am_ptr": "i64", "loss_ptr": "fp32", "lse_ptr": "fp32", "zy_ptr": "fp32"}
    return [Spec("readout_ce", "fastwidth.kernels.readout_ce", "_ce_rows_kernel", dtype,
                 dict(COMPUTE_GRAD=grad, BLOCK_V=4096), 8, 3, types)
            for dtype in ("bf16", "fp32") for grad in (True, False)]


@family("norm")
def _norm_specs() -> list[Spec]:
    from fastwidth.kernels import norm
    mod = "fastwidth.kernels.norm"
    stats = {"mean_ptr": "fp32", "rstd_ptr": "fp32", "rms_ptr": "fp32", "dw_ptr": "fp32", "db_ptr": "fp32",
             "c_ptr": "fp32"}
    out = []
    for dtype in ("bf16", "fp32"):
        for is_rms in (True, False):
            flags = dict(IS_RMS=is_rms, HAS_W=True, HAS_B=not is_rms)
            for bn, chunked in dict.fromkeys(norm.block_plan(n) for n in NORM_WIDTHS):  # the launchers' blocks
                out.append(Spec("norm", mod, "_norm_fwd_kernel", dtype,
                                dict(flags, HAS_RES=True, CHUNKED=chunked, BLOCK_N=bn), norm._warps(bn), 3, stats))
            for bn, chunked in dict.fromkeys(norm.block_plan(n, backward=True) for n in NORM_WIDTHS):
                out.append(Spec("norm", mod, "_norm_bwd_kernel", dtype,
                                dict(flags, HAS_DS=True, ROW_SUMS=chunked, BLOCK_N=bn), norm._bwd_warps(bn), 3, stats))
        for bn in {norm.block_plan(n, backward=True)[0] for n in NORM_WIDTHS if norm.block_plan(n, True)[1]}:
            out.append(Spec("norm", mod, "_norm_bwd_rowsum_kernel", dtype, dict(HAS_W=True, BLOCK_N=bn),
                            norm._warps(bn), 3, stats))
    return out


@family("act")
def _act_specs() -> list[Spec]:
    from fastwidth.kernels import act
    return [Spec("act", "fastwidth.kernels.act", attr, dtype, dict(BLOCK=act._BLOCK), 4, 3, {}, ("n",))
            for attr in ("_gelu_fwd_kernel", "_gelu_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel")
            for dtype in ("bf16", "fp32")]


@family("stats")
def _stats_specs() -> list[Spec]:
    mod = "fastwidth.kernels.stats"
    out = []
    for dtype in ("bf16", "fp32"):
        out.append(Spec("stats", mod, "_moments_kernel", dtype, dict(NB=128, BLOCK=4096), 8, 3,
                        {"part_ptr": "fp32", "hist_ptr": "i32"}))
        out.append(Spec("stats", mod, "_gram_kernel", dtype, dict(HAS_ACC=True, IEEE=dtype == "fp32", BLOCK_P=64,
                                                                   BLOCK_K=32), 4, 3,
                        {"acc_ptr": "fp32", "out_ptr": "fp32"}))
    return out


@family("linear")
def _linear_specs() -> list[Spec]:
    """Every launch of the fused µP linear on each tile linear.tile_for can pick, with strides
    and extents multiples of 8 (ALIGNED, the model widths) and not: the forward per activation
    (bias and a saved pre-activation: training, the most registers), the backward's dx GEMM (W
    column-major; swiglu's halves summed in one launch) and dW GEMM (both operands
    column-major), and the dz pass."""
    from fastwidth.kernels import linear as L
    mod = "fastwidth.kernels.linear_triton"  # the kernels; their tiles are linear.py's
    out = []
    for dtype in ("bf16", "fp32"):
        tiles = ["large", "small"] if dtype == "bf16" else ["fp32"]
        glu = "glu" if dtype == "bf16" else "fp32"
        # (act, tile, A K-contiguous, B K-contiguous, bias and saved z)
        gemms = [(act, t, True, True, True) for act in ("none", "gelu", "relu") for t in tiles]
        gemms += [("swiglu", glu, True, True, True), ("sum", glu, True, False, False)]
        gemms += [("none", t, a_kc, False, False) for t in tiles for a_kc in (True, False)]
        # unaligned (odd) shapes: bf16 on its own tile, whatever the activation
        for (act, t, a_kc, b_kc, train), aligned in [(g, al) for g in gemms for al in (True, False)]:
            if not aligned and dtype == "bf16":
                if t not in ("large", "glu"):
                    continue
                t = "unaligned"
            m, n, k, warps, stages = L._TILES[t]
            cx = dict(ACT=L._ACT_CODE[act], HAS_BIAS=train, SAVE_Z=train and act != "none", A_K_CONTIG=a_kc,
                      B_K_CONTIG=b_kc, ALIGNED=aligned, IEEE=dtype == "fp32", UPCAST=False, BLOCK_M=m, BLOCK_N=n,
                      BLOCK_K=k, GROUP_M=L._GROUP_M)
            out.append(Spec("linear", mod, "_linear_kernel", dtype, cx, warps, stages))
        for act in ("gelu", "relu", "swiglu"):
            out.append(Spec("linear", mod, "_linear_bwd_act_kernel", dtype,
                            dict(ACT=L._ACT_CODE[act], UPCAST=False, BLOCK=L._ELEM_BLOCK), 4, 3, {}, ("n",)))
    return out


FLOAT_ARGS |= {"alpha", "alpha2"}  # the fused linear's multipliers
FAMILIES = tuple(SPECS)  # every family registered above this line


# ---------------------------------------------------------------- one compilation


def _signature(fn, spec: Spec) -> tuple[dict, dict]:
    """Triton signature and attrs: pointers 16-byte aligned (torch allocations are), as the JIT
    would specialize them at launch."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in spec.constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + spec.ptr_types.get(name, TL_DTYPE[spec.dtype])
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name in spec.int64_args else "i32"
    return sig, attrs


def _ptxas(capability: int):
    from triton.backends.nvidia import compiler as nv
    try:
        tool = nv.get_ptxas(capability)
    except TypeError:  # triton < 3.7: one ptxas for every arch
        tool = nv.get_ptxas()
    arch = nv.sm_arch_from_capability(capability)
    return tool.path, arch


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores")


def ptxas_usage(ptx: str, capability: int) -> tuple[int, int]:
    """(registers, spill-store bytes) that ptxas -v reports for the PTX."""
    path, arch = _ptxas(capability)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = [int(x) for x in _PTXAS_REGS.findall(log)]
    spills = [int(x) for x in _PTXAS_SPILL.findall(log)]
    return max(regs, default=0), max(spills, default=0)


def compile_kernel(spec: Spec, capability: int):
    """triton.compile of `spec` for sm_<capability>: the CompiledKernel (asm: ttir, ttgir, ptx, cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec.module), spec.attr)
    sig, attrs = _signature(fn, spec)
    src = ASTSource(fn, sig, dict(spec.constexprs), attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))


def occupancy(registers: int, shared_bytes: int, num_warps: int, capability: int) -> int:
    """CTAs one SM can hold at once, the least of four limits (the CUDA occupancy calculator's rules):
    registers, allocated per warp in units of 256 (so ceil(regs * 32 / 256) * 256 a warp) out of
    65536; shared memory, the block's bytes rounded up to 128 plus 1 KB reserved per block, out
    of 228 KB (sm_90) / 164 KB (sm_80); 64 warps; 32 CTAs. 0: the block does not fit at all."""
    sm = SM[capability]
    warp_regs = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (sm["regs"] // warp_regs) // num_warps
    by_shared = sm["shared"] // (-(-shared_bytes // 128) * 128 + SHARED_RESERVED)
    return int(min(by_regs, by_shared, sm["warps"] // num_warps, sm["ctas"]))


def compile_one(spec: Spec, capability: int) -> dict:
    """Compile `spec` for sm_<capability>; the row for the table (compiled False with the error)."""
    row = dict(family=spec.family, kernel=spec.kernel, config=spec.label(), dtype=spec.dtype, compiled=False,
               shared_bytes=None, registers=None, spills=None, wgmma=False, occupancy=None, dot=False, error="")
    try:
        k = compile_kernel(spec, capability)
        ptx = k.asm["ptx"]
        regs, spills = ptxas_usage(ptx, capability)
        shared = int(k.metadata.shared)
        row.update(compiled=True, shared_bytes=shared, registers=regs, spills=spills, wgmma="wgmma" in ptx,
                   occupancy=occupancy(regs, shared, spec.num_warps, capability), dot="tt.dot" in k.asm["ttir"])
    except Exception as e:  # a config that does not compile is a row of the table, and a failure
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    return row


# ---------------------------------------------------------------- the table and its checks


def failures(rows: list[dict], capability: int) -> list[str]:
    """One line per rule a row breaks: not compiled, over the shared-memory limit of a block, any
    register spill, no CTA fits an SM, and on sm_90 a bf16 kernel with a dot off wgmma."""
    limit = SHARED_LIMIT.get(capability)
    bad = []
    for r in rows:
        name = f"{r['family']}/{r['kernel']} {r['dtype']} [{r['config']}]"
        if not r["compiled"]:
            bad.append(f"{name}: does not compile ({r['error']})")
            continue
        if limit is not None and r["shared_bytes"] > limit:
            bad.append(f"{name}: {r['shared_bytes']} bytes of shared memory > {limit}")
        if r["spills"] > 0:
            bad.append(f"{name}: spills {r['spills']} bytes of registers")
        if r.get("occupancy") == 0:
            bad.append(f"{name}: {r['registers']} registers and {r['shared_bytes']} bytes of shared memory "
                       "do not fit one SM")
        if capability >= 90 and r["dtype"] == "bf16" and r.get("dot") and not r["wgmma"]:
            bad.append(f"{name}: a bf16 dot lowered off wgmma (mma.sync)")
    return bad


def run(arch: str, families: list[str], jobs: int, progress=print, dtypes=("bf16", "fp32")) -> list[dict]:
    capability = parse_arch(arch)
    specs = [s for f in families for s in SPECS[f]() if s.dtype in dtypes]
    rows: list[dict] = [None] * len(specs)  # type: ignore[list-item]
    t0 = time.time()
    with cf.ProcessPoolExecutor(max_workers=jobs) as pool:
        futs = {pool.submit(compile_one, s, capability): i for i, s in enumerate(specs)}
        for done, fut in enumerate(cf.as_completed(futs), 1):
            rows[futs[fut]] = fut.result()
            if done % 10 == 0 or done == len(specs):
                progress(f"aot {arch}: {done}/{len(specs)} compiled in {time.time() - t0:.0f} s")
    return rows


def parse_arch(arch: str) -> int:
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise ValueError(arch)
    return int(m.group(1))


def markdown(rows: list[dict]) -> str:
    head = ("| family | kernel | dtype | config | shared B | regs | spills | wgmma | CTAs/SM |\n"
            "|---|---|---|---|---:|---:|---:|---|---:|")
    body = [f"| {r['family']} | {r['kernel']} | {r['dtype']} | {r['config']} | {r['shared_bytes']} | "
            f"{r['registers']} | {r['spills']} | {'yes' if r['wgmma'] else 'no'} | {r.get('occupancy')} |"
            for r in rows]
    return "\n".join([head, *body])


def write_csv(rows: list[dict], path: str) -> None:
    """The table as CSV (CSV_FIELDS), sorted by family, kernel, dtype, config: a stable diff."""
    import csv
    def key(r):
        return FAMILIES.index(r["family"]) if r["family"] in FAMILIES else 99, r["kernel"], r["dtype"], r["config"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(sorted(rows, key=key))


def totals(rows: list[dict], capability: int) -> str:
    """One line per family and the whole: configs, spilling, bf16 dot configs off wgmma."""
    def line(name, rs):
        off = sum(1 for r in rs if r["dtype"] == "bf16" and r.get("dot") and not r["wgmma"]) if capability >= 90 else 0
        return (f"{name}: {len(rs)} configs, {sum(1 for r in rs if r['compiled'])} compiled, "
                f"{sum(1 for r in rs if (r['spills'] or 0) > 0)} spilling, {off} bf16 dot off wgmma")
    fams = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    return "\n".join([line(f"aot sm_{capability}", rows)] + [line(f"  {f}", [r for r in rows if r["family"] == f])
                                                              for f in fams])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastwidth.kernels.aot", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90", help="sm_90 (H100/H200) or sm_80 (A100)")
    ap.add_argument("--json", default="", help="write the rows to this file")
    ap.add_argument("--csv", default="", help="write the table to this CSV file (e.g. bench/aot_sm90.csv)")
    ap.add_argument("--family", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    ap.add_argument("--dtype", default="bf16,fp32", help="comma list of bf16, fp32")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    a = ap.parse_args(argv)
    try:
        capability = parse_arch(a.arch)
    except ValueError:
        print(f"aot: --arch {a.arch!r} is not of the form sm_90 or sm_80", file=sys.stderr)
        return 2
    if capability not in SHARED_LIMIT:
        print(f"aot: --arch {a.arch} is not one of {', '.join(f'sm_{c}' for c in SHARED_LIMIT)}", file=sys.stderr)
        return 2
    fams = [f for f in a.family.split(",") if f]
    dtypes = [d for d in a.dtype.split(",") if d]
    unknown = [f for f in fams if f not in FAMILIES] + [d for d in dtypes if d not in TL_DTYPE]
    if unknown or a.jobs < 1:
        bad = f"--family/--dtype {','.join(unknown)}" if unknown else f"--jobs {a.jobs}"
        print(f"aot: {bad} is not valid (families: {', '.join(FAMILIES)}; dtypes: bf16, fp32; jobs >= 1)",
              file=sys.stderr)
        return 2
    rows = run(a.arch, fams, a.jobs, progress=lambda s: print(s, file=sys.stderr, flush=True), dtypes=dtypes)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.csv:
        write_csv(rows, a.csv)
    print(markdown(rows) if a.markdown else totals(rows, capability))
    bad = failures(rows, capability)
    for line in bad:
        print(f"aot FAIL: {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
