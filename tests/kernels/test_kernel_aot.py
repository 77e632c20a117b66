"""Ahead-of-time compilation for Hopper (sm_90) and Ampere (sm_80) on this GPU-less machine.

The full sm_90 table is one slow test (about a hundred compilations, cached by Triton between
runs): it fails when any config the launchers or autotuners can pick does not compile, needs
more shared memory than a block may have, or a bf16 attention config spills registers.
"""

import json
import os

import pytest

from fastwidth.kernels import aot


def _row(**kw):
    row = dict(family="attention", kernel="k", config="c", dtype="bf16", compiled=True, shared_bytes=1000,
               registers=128, spills=0, wgmma=True, error="")
    return {**row, **kw}


def test_failure_rules():
    ok = _row()
    assert aot.failures([ok], 90) == []
    assert "does not compile" in aot.failures([_row(compiled=False, error="boom")], 90)[0]
    assert "232448" in aot.failures([_row(shared_bytes=232_449)], 90)[0]
    assert aot.failures([_row(shared_bytes=232_448)], 90) == []
    assert "166912" in aot.failures([_row(shared_bytes=200_000)], 80)[0]  # fits sm_90, not sm_80
    assert "spills" in aot.failures([_row(spills=8)], 90)[0]
    # spills are reported, not fatal, outside bf16 attention (fp32 IEEE tiles, other families)
    assert aot.failures([_row(spills=8, dtype="fp32"), _row(spills=8, family="norm")], 90) == []


def test_every_spec_names_a_kernel_and_its_constexprs():
    specs = [s for f in aot.FAMILIES for s in aot.SPECS[f]()]
    assert {s.family for s in specs} == set(aot.FAMILIES)
    for s in specs:
        import importlib
        fn = getattr(importlib.import_module(s.module), s.attr)
        sig, _ = aot._signature(fn, s)
        assert set(s.constexprs) <= set(fn.arg_names), (s.attr, s.constexprs)
        assert [n for n, t in sig.items() if t == "constexpr"] == [n for n in fn.arg_names if n in s.constexprs]
    att = [s for s in specs if s.family == "attention" and s.dtype == "bf16"]
    assert {s.constexprs["BLOCK_D"] for s in att} == {64, 128}
    assert {s.constexprs.get("CAUSAL") for s in att} == {True, False, None}  # None: the delta kernel


def test_bad_arguments_exit_2(capsys):
    assert aot.main(["--arch", "sm_75"]) == 2
    assert aot.main(["--arch", "hopper"]) == 2
    assert aot.main(["--family", "attn"]) == 2
    assert "attn" in capsys.readouterr().err


def test_sm80_compiles(tmp_path):
    out = tmp_path / "sm80.json"
    assert aot.main(["--arch", "sm_80", "--family", "act,stats", "--json", str(out), "--jobs", "2"]) == 0
    rows = json.loads(out.read_text())
    assert rows and all(r["compiled"] for r in rows)
    assert not any(r["wgmma"] for r in rows)  # no warp-group MMA before Hopper


@pytest.mark.slow
def test_sm90_every_kernel_and_config(tmp_path):
    out = tmp_path / "sm90.json"
    rc = aot.main(["--arch", "sm_90", "--json", str(out), "--jobs", str(max(2, os.cpu_count() or 1))])
    rows = json.loads(out.read_text())
    assert {r["family"] for r in rows} == set(aot.FAMILIES)
    assert set(rows[0]) >= {"family", "kernel", "config", "dtype", "compiled", "shared_bytes", "registers", "spills",
                            "wgmma"}
    assert rc == 0, "\n".join(aot.failures(rows, 90))
    # bf16 attention dots lower to Hopper's warp-group MMA wherever a tile is 64 rows or more
    assert any(r["wgmma"] for r in rows if r["family"] == "attention" and r["dtype"] == "bf16")
