"""Build, load and register the native ops of csrc/ (C++, and CUDA where nvcc and a CUDA torch are there).

    ops = load()          # torch.ops.fastwidth_native, or UserError with one line saying why not
    available()           # the same as a bool, the reason logged once (what backend auto asks)

The sources are compiled on first use with torch.utils.cpp_extension and ninja, never at install
time, into one shared library cached per torch version, Python version and source hash under
$XDG_CACHE_HOME/fastwidth/native (default ~/.cache; FASTWIDTH_NATIVE_CACHE overrides the whole
path). A later process loads the cached library in milliseconds. `fastwidth build-ext` builds
ahead of time. The schemas are declared in csrc/ops.cpp; this module only adds what Python
must: fakes (so torch.compile traces the ops) and autograd for the differentiable ones.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from fastwidth.errors import UserError

log = logging.getLogger("fastwidth.kernels.native")

_PACKAGE = Path(__file__).resolve().parents[1]
# csrc/ beside the package in a checkout; fastwidth/csrc in an installed wheel (setup.py maps it)
CSRC = next((d for d in (_PACKAGE.parent / "csrc", _PACKAGE / "csrc") if d.is_dir()), _PACKAGE.parent / "csrc")
CPU_SOURCES = ("ops.cpp", "moments.cpp", "readout_ce.cpp", "norm.cpp", "rope.cpp")
CUDA_SOURCES = ("moments_cuda.cu",)
HEADERS = ("fastwidth.h",)
# -fno-trapping-math lets branches on floats become blends (vectorized loops); no result changes
CFLAGS = ("-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno")
LDFLAGS = ("-fopenmp",)

_ops = None
_failure: str | None = None


def _with_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.version.cuda is not None and CUDA_HOME is not None


def _sources() -> list[Path]:
    names = CPU_SOURCES + (CUDA_SOURCES if _with_cuda() else ())
    return [CSRC / n for n in names]


def build_key() -> str:
    """torch version, Python version, CUDA or not, and a hash of every source and flag."""
    h = hashlib.sha256()
    for p in sorted(_sources() + [CSRC / n for n in HEADERS]):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    flavour = f"cu{torch.version.cuda}" if _with_cuda() else "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"torch{torch.__version__.split('+')[0]}-{flavour}-{py}-{h.hexdigest()[:16]}"


def cache_dir() -> Path:
    if os.environ.get("FASTWIDTH_NATIVE_CACHE"):
        return Path(os.environ["FASTWIDTH_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fastwidth" / "native"


def _sources_missing() -> str | None:
    """Why the sources cannot be read (None: every source and header is there); checked before
    build_key, which reads them."""
    if not CSRC.is_dir() or not all(p.is_file() for p in _sources() + [CSRC / n for n in HEADERS]):
        return f"native ops unavailable: C++ sources not found at {CSRC} (install from a source checkout)"
    return None


def _why_not() -> str | None:
    """The reason a build cannot start, checked before spending time on it (None: it can)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"native ops unavailable: no C++ compiler ({cxx!r} is not on PATH; install g++ or set CXX)"
    from torch.utils.cpp_extension import is_ninja_available
    if not is_ninja_available():
        return "native ops unavailable: ninja is not installed (pip install ninja)"
    return None


def _check_writable(out: Path) -> None:
    """Make the cache directory `out` and write in it, or raise the one line saying why not (a
    read-only file system, a file where a directory should be, no permission): a build cannot
    start there, and its log could not be kept there either."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        test = out / f".writable-{os.getpid()}"
        test.write_text("")
        test.unlink()
    except OSError as e:
        raise UserError(f"native ops unavailable: cache directory {out} cannot be written ({e.strerror}); "
                        f"set XDG_CACHE_HOME or FASTWIDTH_NATIVE_CACHE to a writable directory") from None


def _keep_log(out: Path, text: str) -> str:
    """Write a failed build's full output to out/build.log; says where it is, or that it is not."""
    try:
        (out / "build.log").write_text(text)
        return f"full log: {out / 'build.log'}"
    except OSError as e:
        return f"no log kept ({out} cannot be written: {e.strerror})"


def _build(out: Path) -> Path:
    """Compile into out/. The C++ files are compiled as one translation unit (a generated file
    including each): parsing torch's headers is most of a file's compile time (~25 s of ~35 s
    each on a 2-core machine), so one unit builds in a fraction of the time of five."""
    from torch.utils.cpp_extension import load as cpp_load
    out.mkdir(parents=True, exist_ok=True)
    name = "fastwidth_native"
    unity = out / f"{name}.cpp"
    unity.write_text("// generated by fastwidth.kernels.native: every csrc/*.cpp in one unit\n"
                     + "".join(f'#include "{CSRC / n}"\n' for n in CPU_SOURCES))
    cuda = [str(CSRC / n) for n in CUDA_SOURCES] if _with_cuda() else []
    cpp_load(name=name, sources=[str(unity)] + cuda, build_directory=str(out),
             extra_cflags=list(CFLAGS), extra_cuda_cflags=["-O3"], extra_ldflags=list(LDFLAGS),
             extra_include_paths=[str(CSRC)], is_python_module=False, verbose=False)
    return out / f"{name}.so"


def load():
    """torch.ops.fastwidth_native with every op loaded, building it first if needed.

    Raises UserError with one line (no compiler, no ninja, no sources, a failed build) otherwise.
    """
    global _ops, _failure
    if _ops is not None:
        return _ops
    if _failure is not None:
        raise UserError(_failure)
    missing = _sources_missing()
    if missing is not None:
        _failure = missing
        raise UserError(missing)
    out = cache_dir() / build_key()
    done = out / "built.ok"  # written after a build loaded: another process may be mid-link
    try:
        if done.is_file():
            torch.ops.load_library(str(out / "fastwidth_native.so"))
        else:
            why = _why_not()
            if why is not None:
                raise UserError(why)
            _check_writable(out)
            t0 = time.perf_counter()
            log.info("building native ops into %s (once per torch version and source change)", out)
            _build(out)
            done.write_text(f"{time.perf_counter() - t0:.1f}\n")
    except UserError as e:
        _failure = str(e)
        raise
    except Exception as e:  # a compiler error: its text is long; keep the first line that says why
        text = str(e).splitlines() or [repr(e)]
        first = next((ln for ln in text if ": error:" in ln or "error:" in ln), text[0])
        _failure = f"native ops failed to build ({first.strip()[:300]}); {_keep_log(out, str(e))}"
        raise UserError(_failure) from e
    _register_python_side()
    _ops = torch.ops.fastwidth_native
    return _ops


def available() -> bool:
    """True when load() succeeds; the first failure is logged once and remembered."""
    try:
        load()
        return True
    except UserError as e:
        if not getattr(available, "_logged", False):
            available._logged = True
            log.warning("%s; kernels=auto runs torch on the CPU", e)
        return False


# ---------------------------------------------------------------- the Python side, registered
# Each kernel family with a native op (norm, readout_ce, rope, stats) registers, when it is
# imported, the function that gives its op a fake (the shapes torch.compile traces with) and an
# autograd formula; load() runs them once the library is in. This module imports no kernel file:
# the arrows point from the families to here, not back.
_python_sides: list = []


def register_python_side(fn) -> None:
    """Run fn() once the native library is loaded: at load(), or now if it is loaded already."""
    _python_sides.append(fn)
    if _ops is not None:
        fn()


def _register_python_side() -> None:
    for fn in _python_sides:
        fn()


# ---------------------------------------------------------------- calls the functionals make


def readout_ce(h, weight, bias, target, multiplier, z_loss, label_smoothing, ignore_index, chunk_rows):
    """(total, token_loss, lse, true_logit, argmax) of the native readout + CE (flat, fp32 stats).

    As the Triton path: under autocast h comes in bf16 with fp32 parameters, so the GEMMs run in
    h's dtype (the casts are differentiable: dW/db come back in the parameters' dtype).
    """
    needs = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, weight, bias))
    h2 = h.reshape(-1, h.shape[-1]).contiguous()
    w = weight.to(h.dtype).contiguous()
    b = bias.to(h.dtype) if bias is not None else None
    out = load().readout_ce(h2, w, b, target.contiguous(), float(multiplier), float(z_loss),
                            float(label_smoothing), int(ignore_index), needs, int(chunk_rows or 0))
    return out[:5]


# ---------------------------------------------------------------- `fastwidth build-ext`


def cmd_build_ext(args) -> int:
    t0 = time.perf_counter()
    out = cache_dir() / build_key()
    cached = (out / "built.ok").is_file()
    load()
    ops = ("moments_histogram", "readout_ce", "norm_fwd", "norm_bwd", "rope")
    missing = [o for o in ops if not hasattr(torch.ops.fastwidth_native, o)]
    if missing:
        raise UserError(f"native library loaded from {out} lacks ops {', '.join(missing)}")
    what = "loaded from cache" if cached else "built"
    print(f"native ops {what} in {time.perf_counter() - t0:.1f} s: {out} "
          f"({'CPU + CUDA' if _with_cuda() else 'CPU'}; {', '.join(ops)})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-ext", help="build (or load from cache) the native C++/CUDA ops of csrc/")
    p.set_defaults(func=cmd_build_ext)
