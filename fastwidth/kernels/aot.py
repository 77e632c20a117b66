"""Ahead-of-time compilation of every Triton kernel for a GPU this machine does not have.

    python -m fastwidth.kernels.aot --arch sm_90 [--json FILE] [--csv FILE] [--family attention,norm] [--jobs N]

Compiles each entry of every kernel family's AOT_KERNELS table (declared beside the family's
kernels from the configs its launchers and autotuners use: head_dim 64 and 128; bf16, and fp32
where a GPU launch can take fp32; causal and not; norm widths up to the 32k limit), with
triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)): no GPU and no driver are
needed. Triton's bundled ptxas -v then reports registers and spills of the PTX. One row per
compilation: {"family", "kernel", "config", "dtype", "compiled", "shared_bytes", "registers",
"spills", "wgmma", "occupancy", "dot", "error"}; spills are ptxas's spill-store bytes, wgmma says
whether a dot lowered to Hopper's warp-group MMA, dot whether the kernel has a tl.dot at all,
occupancy the CTAs an SM can hold (`occupancy`). Exit code 1 (with one line per failure) when a
config does not compile, needs more shared memory than a block may have, spills a register, does
not fit an SM, or (sm_90) has a bf16 dot off wgmma. `make aot` writes the sm_90 table to
bench/aot_sm90.csv; tests/kernels/test_kernel_aot.py gates on it.
A family is a kernels module with an AOT_KERNELS table, named in FAMILY_MODULES.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
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
TL_DTYPE = {"bf16": "bf16", "fp32": "fp32"}


@dataclass
class Spec:
    """One compilation: the @jit kernel `fn` of family `family` with these constexprs and launch
    options (an AotConfig of the family's table, with the family's name)."""

    family: str
    fn: object
    dtype: str
    constexprs: dict
    num_warps: int
    num_stages: int = 3
    ptr_types: dict = field(default_factory=dict)  # pointer args not in `dtype`
    scalar_types: dict = field(default_factory=dict)  # scalar args that are not i32: "fp32" | "i64"

    @classmethod
    def of(cls, family: str, config) -> "Spec":
        """The Spec of one AotConfig of `family`'s table."""
        return cls(family, config.fn, config.dtype, dict(config.constexprs), config.num_warps, config.num_stages,
                   dict(config.ptr_types), dict(config.scalar_types))

    @property
    def kernel(self) -> str:
        return self.fn.__name__.lstrip("_")

    def label(self) -> str:
        cs = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items())
        return f"{cs} warps={self.num_warps} stages={self.num_stages}"


# ---------------------------------------------------------------- the families and their tables

# The module of each family, whose AOT_KERNELS table lists the configs its launchers can pick.
FAMILY_MODULES = {"attention": "fastwidth.kernels.attention", "readout_ce": "fastwidth.kernels.readout_ce",
                  "norm": "fastwidth.kernels.norm", "act": "fastwidth.kernels.act", "stats": "fastwidth.kernels.stats",
                  "linear": "fastwidth.kernels.linear"}


def table_specs(name: str, module: str):
    """The function returning the Specs of `module`'s AOT_KERNELS table, as family `name`."""
    def specs() -> list[Spec]:
        return [Spec.of(name, c) for c in importlib.import_module(module).AOT_KERNELS]
    return specs


# family -> () -> list[Spec], in registration order
SPECS: dict = {name: table_specs(name, module) for name, module in FAMILY_MODULES.items()}
FAMILIES = tuple(SPECS)  # the families of FAMILY_MODULES


def family(name: str):
    """Register a function returning a family's Specs under `name`: a family whose kernels live
    outside FAMILY_MODULES (its table elsewhere) needs only this."""
    def register(fn):
        SPECS[name] = fn
        return fn
    return register


def plan(families, dtypes=("bf16", "fp32")) -> list[Spec]:
    """Every compilation `run` makes for these families and dtypes, in table order: one row each."""
    return [s for f in families for s in SPECS[f]() if s.dtype in dtypes]


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
        else:
            sig[name] = spec.scalar_types.get(name, "i32")
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

    sig, attrs = _signature(spec.fn, spec)
    src = ASTSource(spec.fn, sig, dict(spec.constexprs), attrs)
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


@functools.lru_cache(maxsize=None)
def _planned(families: tuple, dtypes: tuple) -> list[Spec]:
    return plan(families, dtypes)


def _compile_planned(families: tuple, dtypes: tuple, index: int, capability: int) -> dict:
    # A Spec holds its @jit kernel, which does not pickle: a worker process takes the plan's
    # index and reads the same tables itself (once: the plan is cached per process).
    return compile_one(_planned(families, dtypes)[index], capability)


def run(arch: str, families: list[str], jobs: int, progress=print, dtypes=("bf16", "fp32")) -> list[dict]:
    capability = parse_arch(arch)
    families, dtypes = tuple(families), tuple(dtypes)
    specs = plan(families, dtypes)
    rows: list[dict] = [None] * len(specs)  # type: ignore[list-item]
    t0 = time.time()
    with cf.ProcessPoolExecutor(max_workers=jobs) as pool:
        futs = {pool.submit(_compile_planned, families, dtypes, i, capability): i for i in range(len(specs))}
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
