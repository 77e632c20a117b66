"""Ahead-of-time compilation for Hopper (sm_90) and Ampere (sm_80) on this GPU-less machine.

The full sm_90 table is one slow test (about a hundred compilations, cached by Triton between
runs; `make test-all` runs it in CI): it fails when any config the launchers or autotuners can
pick does not compile, needs more shared memory than a block may have, spills a register, fits
no SM, or has a bf16 dot off wgmma, and when bench/aot_sm90.csv (`make aot`) no longer lists
exactly the configs the launchers can pick.
"""

import ast
import csv
import importlib
import json
import os
import pkgutil
from pathlib import Path

import pytest
import torch

import fastwidth.kernels
from fastwidth.kernels import act, aot, linear, norm


ROOT = Path(__file__).resolve().parents[2]


def _row(**kw):
    row = dict(family="attention", kernel="k", config="c", dtype="bf16", compiled=True, shared_bytes=1000,
               registers=128, spills=0, wgmma=True, occupancy=2, dot=True, error="")
    return {**row, **kw}


def test_failure_rules():
    ok = _row()
    assert aot.failures([ok], 90) == []
    assert "does not compile" in aot.failures([_row(compiled=False, error="boom")], 90)[0]
    assert "232448" in aot.failures([_row(shared_bytes=232_449)], 90)[0]
    assert aot.failures([_row(shared_bytes=232_448)], 90) == []
    assert "166912" in aot.failures([_row(shared_bytes=200_000)], 80)[0]  # fits sm_90, not sm_80
    # any spill fails, in any family and dtype
    for kw in (dict(), dict(dtype="fp32"), dict(family="norm", dot=False)):
        assert "spills 8 bytes" in aot.failures([_row(spills=8, **kw)], 90)[0]
    # a bf16 dot off wgmma fails on Hopper; fp32 dots (IEEE, no tensor cores), dot-free kernels and
    # sm_80 (no wgmma) do not
    assert "off wgmma" in aot.failures([_row(wgmma=False)], 90)[0]
    assert aot.failures([_row(wgmma=False, dtype="fp32"), _row(wgmma=False, dot=False)], 90) == []
    assert aot.failures([_row(wgmma=False)], 80) == []
    assert "do not fit" in aot.failures([_row(occupancy=0)], 90)[0]


def test_occupancy_by_hand():
    # 128 regs x 32 threads = 4096 a warp; 65536 / 4096 = 16 warps -> 2 CTAs of 8 warps
    assert aot.occupancy(128, 1000, 8, 90) == 2
    # 129 regs round up to 4352 a warp (units of 256): 15 warps -> 1 CTA of 8
    assert aot.occupancy(129, 1000, 8, 90) == 1
    # shared memory: 100 KB + 1 KB reserved, 228 KB an SM -> 2; sm_80's 164 KB -> 1
    assert aot.occupancy(32, 100 * 1024, 4, 90) == 2 and aot.occupancy(32, 100 * 1024, 4, 80) == 1
    # warps: 64 an SM -> 2 CTAs of 32 warps; CTAs: at most 32
    assert aot.occupancy(16, 0, 32, 90) == 2 and aot.occupancy(16, 0, 1, 90) == 32
    # 255 registers at 32 warps (1024 threads) need 261120 > 65536: does not fit
    assert aot.occupancy(255, 0, 32, 90) == 0


def test_a_family_is_a_function_and_a_registration(monkeypatch):
    monkeypatch.setattr(aot, "SPECS", dict(aot.SPECS))
    spec = aot.Spec("extra", act.AOT_KERNELS[0].fn, "bf16", dict(BLOCK=1024), 4)
    aot.family("extra")(lambda: [spec])
    assert aot.SPECS["extra"]() == [spec]

def test_every_spec_names_a_kernel_and_its_constexprs():
    specs = [s for f in aot.FAMILIES for s in aot.SPECS[f]()]
    assert {s.family for s in specs} == set(aot.FAMILIES)
    for s in specs:
        fn = s.fn
        sig, _ = aot._signature(fn, s)
        assert set(s.constexprs) <= set(fn.arg_names), (s.kernel, s.constexprs)
        assert [n for n, t in sig.items() if t == "constexpr"] == [n for n in fn.arg_names if n in s.constexprs]
    att = [s for s in specs if s.family == "attention" and s.dtype == "bf16"]
    assert {s.constexprs["BLOCK_D"] for s in att} == {64, 128}
    # fp32 attention on a GPU runs SDPA: no fp32 attention config can be dispatched, none is listed
    assert not [s for s in specs if s.family == "attention" and s.dtype != "bf16"]
    assert {s.constexprs.get("CAUSAL") for s in att} == {True, False, None}  # None: the delta kernel


def _private_names_of_kernels_modules() -> set[str]:
    names = set()
    for m in pkgutil.iter_modules(fastwidth.kernels.__path__):
        if m.name != "aot":
            mod = importlib.import_module(f"fastwidth.kernels.{m.name}")
            names |= {n for n in vars(mod) if _private(n)}
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name != "_"  # `_`: register_fake's throwaways


def test_aot_reads_no_private_name_of_a_kernels_module():
    # the configs come from each family's public AOT_KERNELS table, never re-derived from a
    # module's private tiles (`L._TILES`), kernels looked up by name ("_attn_fwd_kernel") or a
    # private module
    private = _private_names_of_kernels_modules()
    assert {"_attn_fwd_kernel", "_norm_fwd_kernel", "_tuned"} <= private  # the kernels modules' private names
    tree = ast.parse(Path(aot.__file__).read_text())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            bad.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in private or "fastwidth.kernels._" in node.value:
                bad.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastwidth.kernels"):
            names = [node.module] + [a.name for a in node.names]
            bad += [f"line {node.lineno}: import {n}" for n in names if any(_private(p) for p in n.split("."))]
    assert bad == []


def test_the_plan_is_the_families_tables():
    # every family's table, entry for entry and in order, is what `run` compiles (no compiling here)
    for name, module in aot.FAMILY_MODULES.items():
        table = importlib.import_module(module).AOT_KERNELS
        assert table, name
        want = [(name, c.fn.__name__.lstrip("_"), c.dtype, c.constexprs, c.num_warps, c.num_stages) for c in table]
        got = [(s.family, s.kernel, s.dtype, s.constexprs, s.num_warps, s.num_stages) for s in aot.plan([name])]
        assert got == want, name
    everything = aot.plan(aot.FAMILIES)
    assert aot.plan(aot.FAMILIES, ("fp32",)) == [s for s in everything if s.dtype == "fp32"]
    assert len({(s.family, s.kernel, s.dtype, s.label()) for s in everything}) == len(everything)  # one row each
    # the committed table (make aot) lists exactly the planned rows
    committed = list(csv.DictReader((ROOT / "bench" / "aot_sm90.csv").open()))
    planned = [dict(family=s.family, kernel=s.kernel, dtype=s.dtype, config=s.label()) for s in everything]
    assert _keys(committed) == _keys(planned), "bench/aot_sm90.csv is stale: run `make aot`"


def _launch(c) -> tuple:
    return c.constexprs.get("BLOCK_M"), c.constexprs.get("BLOCK_N"), c.constexprs.get("BLOCK_K"), c.num_warps, \
        c.num_stages


def test_the_launchers_pick_only_what_the_tables_compile():
    # one home: the tile a GPU launch of the fused linear picks at any shape, and the norm block
    # and warps at each model width, are among the compiled entries of their family's table
    gemm = {dt: {_launch(c) for c in linear.AOT_KERNELS if c.fn.__name__ == "_linear_kernel" and c.dtype == dt}
            for dt in ("bf16", "fp32")}
    for dtype, dt in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for M, N in ((64, 64), (256, 512), (4096, 4096), (8192, 50304)):
            for act_name in linear.ACTS:
                for aligned in (True, False):
                    assert linear.tile_for(M, N, dtype, act_name, False, aligned) in gemm[dt], (M, N, dt, act_name)
    fwd = {(c.constexprs["BLOCK_N"], c.constexprs["CHUNKED"], c.num_warps) for c in norm.AOT_KERNELS
           if c.fn.__name__ == "_norm_fwd_kernel"}
    bwd = {(c.constexprs["BLOCK_N"], c.constexprs["ROW_SUMS"], c.num_warps) for c in norm.AOT_KERNELS
           if c.fn.__name__ == "_norm_bwd_kernel"}
    for n in norm.AOT_WIDTHS:
        bn, chunked = norm.block_plan(n)
        assert (bn, chunked, norm.num_warps(bn)) in fwd
        bn, chunked = norm.block_plan(n, backward=True)
        assert (bn, chunked, norm.bwd_num_warps(bn)) in bwd


def test_bad_arguments_exit_2(capsys):
    assert aot.main(["--arch", "sm_75"]) == 2
    assert aot.main(["--arch", "hopper"]) == 2
    assert aot.main(["--family", "attn"]) == 2
    assert "attn" in capsys.readouterr().err


def test_sm80_compiles(tmp_path):
    out = tmp_path / "sm80.json"
    # bf16 only: the fp32 IEEE Gram tile spills 12 B on sm_80 (Ampere is not what CI gates)
    assert aot.main(["--arch", "sm_80", "--family", "act,stats", "--dtype", "bf16", "--json", str(out),
                     "--jobs", "2"]) == 0
    rows = json.loads(out.read_text())
    assert rows and all(r["compiled"] for r in rows)
    assert not any(r["wgmma"] for r in rows)  # no warp-group MMA before Hopper


def _keys(rows):
    return sorted((r["family"], r["kernel"], r["dtype"], r["config"]) for r in rows)


@pytest.mark.slow
def test_sm90_every_kernel_and_config(tmp_path):
    out, table = tmp_path / "sm90.json", tmp_path / "aot_sm90.csv"
    rc = aot.main(["--arch", "sm_90", "--json", str(out), "--csv", str(table),
                   "--jobs", str(max(2, os.cpu_count() or 1))])
    rows = json.loads(out.read_text())
    assert {r["family"] for r in rows} == set(aot.FAMILIES)
    assert set(rows[0]) >= {"family", "kernel", "config", "dtype", "compiled", "shared_bytes", "registers", "spills",
                            "wgmma", "occupancy"}
    assert rc == 0, "\n".join(aot.failures(rows, 90))
    assert all(r["occupancy"] >= 1 for r in rows)
    # the committed table (make aot) lists exactly the configs the launchers can pick now
    committed = list(csv.DictReader((ROOT / "bench" / "aot_sm90.csv").open()))
    assert _keys(committed) == _keys(rows), "bench/aot_sm90.csv is stale: run `make aot`"
    assert all(int(r["spills"]) == 0 for r in committed)
