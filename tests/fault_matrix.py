"""Issue 29's fault matrix: the 24 numbered ways a user can hurt a run, as data, run from outside.

    python tests/fault_matrix.py --tree PATH --table [--before PATH] [--only 7,14]

Each case is a setup (it makes what the fault needs in a fresh directory: runs, shards, planted
files, environment) and the command a user would type (`python -m fastwidth.cli ...`,
launch/train.py), run as a subprocess against the fastwidth checkout at PATH (PYTHONPATH=PATH).
The runner gives, per case, the exit code, the lines written to stderr and what was left behind:
temporary files (.tmp-*, .tmp), a watched file or directory that changed, a payload's marker file,
a directory a refused command should not have made. What every case expects, as the issue
intends: exit 2 and one line on stderr naming what is wrong, nothing left behind (a few
fallbacks exit 0 with one warning line; each case says). tests/test_fault_matrix.py asserts it
in the slow tier; `--table` prints the markdown table (with `--before`, against a second checkout
too: the before/after of the closing note).

The runs are tiny (MLP widths 8 and 16, 2-3 steps, one thread, no report); the base runs several
cases share are trained once per Workspace and copied. Full disks and read-only directories are
made by tests/faultfs/sitecustomize.py, no root needed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
FAULTFS = HERE / "faultfs"
BIN = Path(sys.executable).parent
MLP = ["model.arch=mlp", "model.depth=2", "param.base_width=8", "data.source=synthetic", "data.batch_size=8",
       "data.in_dim=6", "data.num_classes=3", "data.probe_size=16", "sweep.widths=[8,16]", "train.progress=false",
       "train.log_every=1", "stats.every=2", "train.report=false", "train.threads=1"]
GPT = ["model.arch=gpt", "model.depth=1", "model.head_dim=8", "param.base_width=16", "data.seq_len=16",
       "data.batch_size=4", "data.probe_size=4", "sweep.widths=[16]", "train.progress=false", "train.log_every=1",
       "stats.enabled=false", "train.report=false", "train.threads=1", "data.bpe_train_bytes=2000"]
WIDE_MLP = 16384  # 1 GiB per hidden matrix: the planner passes on any host, RLIMIT_AS below fails
MEMORY_LIMIT = 3 << 30  # torch and fastwidth import and train width 8 within it (measured: 16 s)


# ------------------------------------------------------------------------------ what a case is

@dataclass
class Setup:
    """What a case runs and what must hold after it: argv after the interpreter (or a launcher's
    whole command with `launcher`), extra environment, and the paths to check."""
    argv: list[str]
    env: dict = field(default_factory=dict)
    watch: list[Path] = field(default_factory=list)    # must be unchanged (contents, listing)
    absent: list[Path] = field(default_factory=list)   # must not exist after (markers, outputs)
    temps: list[Path] = field(default_factory=list)    # directories with no .tmp-* / *.tmp left
    preexec: Callable | None = None
    launcher: bool = False
    timeout: float = 180


@dataclass(frozen=True)
class Expect:
    code: int | tuple = 2
    lines: int | None = 1          # lines on stderr (None: any)
    names: str | None = None       # text the output must hold (the file or key at fault)
    check: Callable | None = None  # (stdout, stderr) -> what is wrong, or None


@dataclass(frozen=True)
class Case:
    number: str
    title: str
    owner: str
    setup: Callable[["Workspace", Path], Setup]
    expect: Expect = Expect()
    multi_rank: bool = False


@dataclass
class Result:
    code: int | str
    lines: int
    left: list[str]
    stdout: str
    stderr: str

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr + self.stdout

    @property
    def tail(self) -> str:
        return (self.stderr + self.stdout)[-4000:]

    def failures(self, expect: Expect) -> list[str]:
        out = []
        codes = expect.code if isinstance(expect.code, tuple) else (expect.code,)
        if self.code not in codes:
            out.append(f"exit {self.code}, expected {expect.code}")
        if expect.lines is not None and self.lines != expect.lines:
            out.append(f"{self.lines} lines on stderr, expected {expect.lines}")
        if self.traceback:
            out.append("a traceback")
        if expect.names and expect.names not in self.stderr + self.stdout:
            out.append(f"the output does not name {expect.names!r}")
        if expect.check and expect.check(self.stdout, self.stderr):
            out.append(expect.check(self.stdout, self.stderr))
        return out + [f"left {x}" for x in self.left]


# ------------------------------------------------------------------------------ the workspace

class Workspace:
    """A tmp directory, the checkout under test, and the base runs several cases copy."""

    def __init__(self, tree: Path, root: Path):
        self.tree, self.root = Path(tree).resolve(), Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = self.root / "empty.yaml"
        self.config.write_text("{}\n")
        self.cache = self.root / "cache"
        self._bases: dict[str, Path] = {}

    def env(self, extra: dict | None = None, faults: bool = False) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "PYTHONPATH")}
        env.update(PYTHONPATH=os.pathsep.join([str(self.tree)] + ([str(FAULTFS)] if faults else [])),
                   OMP_NUM_THREADS="1")
        return {**env, **(extra or {})}

    def cli(self, *args: str) -> list[str]:
        return ["-m", "fastwidth.cli", *[str(a) for a in args]]

    def train(self, out: Path, *sets: str, base=MLP) -> list[str]:
        return self.cli("train", "--config", self.config, "--set", *base, f"train.out_dir={out}",
                        f"data.cache_dir={self.cache}", *sets)

    def call(self, argv: list[str], env: dict | None = None, launcher: bool = False, timeout: float = 600):
        cmd = argv if launcher else [sys.executable, *argv]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env or self.env(), cwd=self.root,
                             timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"setup command failed ({res.returncode}): {' '.join(map(str, cmd))}\n{res.stderr[-3000:]}")
        return res

    def corpus(self) -> Path:
        """A directory of 10 small text files: a BPE trains on the first (data.bpe_train_bytes
        takes whole files), the probe is held out of the last."""
        d = self.root / "corpus"
        if not d.is_dir():
            d.mkdir(parents=True)
            words = ["width", "seed", "probe", "signature", "checkpoint", "kernel", "stream", "the", "a", "of"]
            for k in range(10):
                (d / f"part{k}.txt").write_text("\n".join(" ".join(words[(i * 7 + j * 3 + k) % len(words)]
                                                                    for j in range(12)) for i in range(250)) + "\n")
        return d

    def text(self) -> list[str]:
        """The overrides of a text run on the workspace's corpus."""
        return ["data.source=text", f"data.path={self.corpus()}"]

    def base(self, kind: str, into: Path) -> Path:
        """A copy, at `into`, of the base run `kind` (trained once by the checkout under test)."""
        if kind not in self._bases:
            self._bases[kind] = BASES[kind](self, self.root / "bases" / kind)
        shutil.copytree(self._bases[kind], into, symlinks=True)
        return into


def _base_mlp(ws: Workspace, out: Path, *sets: str) -> Path:
    ws.call(ws.train(out, "train.steps=3", *sets))
    return out


def _base_shards(ws: Workspace, out: Path, tokenizer: str = "bytes") -> Path:
    ws.call(ws.cli("data", "prepare", "--source", "text", "--path", ws.corpus(), "--tokenizer", tokenizer,
                   "--bpe-vocab-size", "300", "--set", "data.bpe_train_bytes=2000", "--out", out, "--no-progress"))
    return out


def _base_gpt_on_shards(ws: Workspace, out: Path) -> Path:
    shards = ws.base("shards", out.parent / f"{out.name}-shards")
    ws.call(ws.train(out, "data.source=shards", f"data.path={shards}", "train.steps=2", base=GPT))
    return out


def _base_sharded(backend: list[str]) -> Callable:
    def build(ws: Workspace, out: Path) -> Path:
        ws.call(torchrun(ws, ws.train(out, "train.steps=2", *backend)[3:]), launcher=True)
        return out
    return build


def _base_gpt_on_text(ws: Workspace, out: Path, *sets: str) -> Path:
    """A reference run whose probe does not depend on data.seed (the text's held-out split)."""
    ws.call(ws.train(out, *ws.text(), "train.steps=2", "stats.enabled=true", "stats.every=2", *sets, base=GPT))
    return out


BASES = {"mlp": _base_mlp, "gpt_text": _base_gpt_on_text, "mlp_other_probe": lambda ws, out: _base_mlp(ws, out, "data.probe_size=8"),
         "shards": _base_shards, "gpt_shards": _base_gpt_on_shards,
         "fsdp2": _base_sharded(["dist.backend=fsdp2"]),
         "deepspeed": _base_sharded(["dist.backend=deepspeed", "dist.zero_stage=2"])}


def torchrun(ws: Workspace, cli_args: list[str]) -> list[str]:
    """2 CPU ranks of launch/train.py (cli_args: what follows `train`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={port}",
            str(ws.tree / "launch" / "train.py"), *[str(a) for a in cli_args]]


# ------------------------------------------------------------------------------ the runner

def snapshot(paths: list[Path]) -> dict:
    """sha256 of each watched file, or of a directory's listing and files."""
    out = {}
    for p in paths:
        h = hashlib.sha256()
        for f in sorted([p] if p.is_file() else p.rglob("*") if p.is_dir() else []):
            h.update(str(f.relative_to(p.parent)).encode())
            if f.is_file():
                h.update(f.read_bytes())
        out[p] = (p.exists(), h.hexdigest())
    return out


def run_case(case: Case, ws: Workspace) -> Result:
    """Set the case up in a fresh directory, run its command, and say what it left."""
    here = ws.root / f"case{case.number}"
    shutil.rmtree(here, ignore_errors=True)
    here.mkdir(parents=True)
    setup = case.setup(ws, here)
    before = snapshot(setup.watch)
    cmd = setup.argv if setup.launcher else [sys.executable, *setup.argv]
    faults = any(k.startswith("FASTWIDTH_FAULT_") for k in setup.env)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=ws.env(setup.env, faults), cwd=here,
                             timeout=setup.timeout, preexec_fn=setup.preexec)
        code, err, out = res.returncode, res.stderr, res.stdout
    except subprocess.TimeoutExpired as e:
        code = f"hang (killed at {setup.timeout:.0f} s)"
        err, out = _text(e.stderr), _text(e.stdout)
    (ws.root / f"case{case.number}.out").write_text(f"$ {' '.join(map(str, cmd))}\n{err}\n{out}")  # for a look
    left = [f"changed {_short(p, ws)}" for p, v in snapshot(setup.watch).items() if v != before[p]]
    left += [_short(p, ws) for p in setup.absent if p.exists()]
    for d in setup.temps:
        left += [_short(p, ws) for p in d.rglob("*") if p.name.startswith(".tmp-") or p.suffix == ".tmp"]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return Result(code, len(lines), left, out, err)


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _short(p: Path, ws: Workspace) -> str:
    return str(p.relative_to(ws.root)) if p.is_relative_to(ws.root) else str(p)


# ------------------------------------------------------------------------------ the cases' setups

class Payload:
    """A pickle that, unpickled, writes `marker`: what a planted checkpoint file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


PICKLED = (".metadata", ".pt", ".pth", ".pkl", ".bin", ".distcp")


def plant(ckpt: Path, marker: Path, default_name: str) -> None:
    """Replace every file of the checkpoint's engine/ that a loader would unpickle with a payload;
    where none is left (a format without pickle), add one as `default_name` beside each member's
    files: a file no sha256 list covers."""
    engine = ckpt / "engine"
    targets = [f for f in engine.rglob("*") if f.is_file() and f.name.endswith(PICKLED)]
    if not targets:
        targets = [d / default_name for d in engine.iterdir() if d.is_dir()] or [engine / default_name]
    for f in targets:
        f.write_bytes(pickle.dumps(Payload(marker)))


def planted(kind: str, default_name: str) -> Callable:
    def setup(ws: Workspace, here: Path) -> Setup:
        run = ws.base(kind, here / "run")
        latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
        plant(latest, here / "payload-ran", default_name)
        return Setup(ws.cli("export", run, "-o", here / "out.safetensors"), absent=[here / "payload-ran",
                     here / "out.safetensors"], watch=[run])
    return setup


def export_onto_metrics(ws, here):
    run = ws.base("mlp", here / "run")
    return Setup(ws.cli("export", run, "-o", run / "metrics.jsonl"), watch=[run])


def prepare_into_existing(ws, here):
    (here / "out").mkdir()
    (here / "out" / "notes.txt").write_text("mine")
    return Setup(ws.cli("data", "prepare", "--source", "text", "--path", ws.corpus(), "--out", here / "out",
                        "--no-progress"), watch=[here / "out"])


def fresh_run(*sets: str, base=MLP, env: dict | None = None, **kw) -> Callable:
    """A training command into a new out_dir that must be refused before making it."""
    def setup(ws, here):
        return Setup(ws.train(here / "run", "train.steps=2", *sets, base=base), env=env or {},
                     absent=[here / "run"], **kw)
    return setup


def reference_with_other_data_seed(ws, here):
    ref = ws.base("gpt_text", here / "ref")
    return Setup(ws.train(here / "run", *ws.text(), "train.steps=2", "stats.enabled=true", "stats.every=2",
                          f"stats.reference_run={ref}", "data.seed=5", base=GPT), absent=[here / "run"], watch=[ref])


def reference_with_corrupt_signature(ws, here):
    ref = ws.base("mlp", here / "ref")
    sig = sorted((ref / "signatures").rglob("step_00000002.safetensors"))[0]
    sig.write_bytes(sig.read_bytes()[:40])
    return Setup(ws.train(here / "run", "train.steps=2", f"stats.reference_run={ref}"),
                 absent=[here / "run"], watch=[ref])


def disk_full_at_checkpoint(ws, here):
    out = here / "run"
    env = {"FASTWIDTH_FAULT_PATH": str(out / "checkpoints"), "FASTWIDTH_FAULT_MATCH": "step_000003"}
    return Setup(ws.train(out, "train.steps=3", "train.ckpt_every=2"), env=env, temps=[out],
                 absent=[out / ".lock"])


def read_only_xdg_cache(ws, here):
    xdg = here / "xdg"
    xdg.mkdir()
    env = {"XDG_CACHE_HOME": str(xdg), "FASTWIDTH_NATIVE_CACHE": "", "FASTWIDTH_FAULT_PATH": str(xdg),
           "FASTWIDTH_FAULT_ERRNO": "EROFS"}
    return Setup(ws.train(here / "run", "train.steps=2", "train.kernels=auto"), env=env, watch=[xdg])


def read_only_cache_dir(ws, here):
    cache = here / "cache"
    cache.mkdir()
    env = {"FASTWIDTH_FAULT_PATH": str(cache), "FASTWIDTH_FAULT_ERRNO": "EROFS"}
    return Setup(ws.train(here / "run", "train.steps=2", *ws.text(), f"data.cache_dir={cache}", base=GPT),
                 env=env, absent=[here / "run"], watch=[cache])


def typed_meta(ws, here):
    run = ws.base("mlp", here / "run")
    meta = run / "checkpoints" / "step_000003" / "meta.json"
    meta.write_text(meta.read_text().replace('"step": 3,', '"step": "three",', 1).replace('"members": [', '"members": 7, "x": [', 1))
    return Setup(ws.cli("export", run, "-o", here / "out.safetensors"), absent=[here / "out.safetensors"], watch=[run])


def metrics_row_array(ws, here):
    run = ws.base("mlp", here / "run")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([rows[0], "[1, 2, 3]", *rows[1:]]) + "\n")
    return Setup(ws.cli("report", run, "-o", here / "report"), absent=[here / "report"], watch=[run])


def signature_not_safetensors(ws, here):
    run = ws.base("mlp", here / "run")
    sig = sorted((run / "signatures").rglob("step_00000002.safetensors"))[0]
    sig.write_text("not a safetensors file")
    return Setup(ws.cli("report", run, "-o", here / "report"), absent=[here / "report"], watch=[run])


def report_onto_a_file(ws, here):
    run = ws.base("mlp", here / "run")
    (here / "notes.txt").write_text("mine")
    return Setup(ws.cli("report", run, "-o", here / "notes.txt"), watch=[here / "notes.txt", run])


def memory_limit(ws, here):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    return Setup(ws.train(here / "run", "train.steps=2", f"sweep.widths=[{WIDE_MLP}]", "stats.enabled=false"),
                 preexec=limit, absent=[here / "run" / ".lock"])


def resume_on_other_vocabulary(ws, here):
    run = ws.base("gpt_shards", here / "run")
    shards = _shards_of(run)
    shutil.rmtree(shards)
    _base_shards(ws, shards, tokenizer="bpe")
    return Setup(ws.train(run, "train.steps=4", "train.resume=true", "data.source=shards", f"data.path={shards}",
                          base=GPT), watch=[run / "metrics.jsonl", run / "checkpoints"])


def _shards_of(run: Path) -> Path:
    import yaml
    return Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["path"])


def tokenizer_ignored_for_shards(ws, here):
    shards = ws.base("shards", here / "shards")
    return fresh_run("data.source=shards", f"data.path={shards}", "data.tokenizer=bpe", base=GPT)(ws, here)


def out_dir_inside_data_path(ws, here):
    corpus = here / "corpus"
    shutil.copytree(ws.corpus(), corpus)
    return Setup(ws.train(corpus / "run", "train.steps=2", "data.source=text", f"data.path={corpus}", base=GPT),
                 absent=[corpus / "run"], watch=[corpus / "part0.txt"])


def latest_outside_the_run(ws, here):
    run = ws.base("mlp", here / "run")
    shutil.copytree(run / "checkpoints" / "step_000003", here / "elsewhere" / "step_000003")
    (run / "checkpoints" / "latest").write_text("../../elsewhere/step_000003\n")
    shutil.rmtree(run / "checkpoints" / "step_000003")
    return Setup(ws.cli("export", run, "-o", here / "out.safetensors"), absent=[here / "out.safetensors"],
                 watch=[run])


def metrics_deleted_then_resumed(ws, here):
    run = ws.base("mlp", here / "run")
    (run / "metrics.jsonl").unlink()
    return Setup(ws.train(run, "train.steps=4", "train.resume=true"), watch=[run / "checkpoints" / "step_000003"])


def report_on_other_probes(ws, here):
    a, b = ws.base("mlp", here / "a"), ws.base("mlp_other_probe", here / "b")
    return Setup(ws.cli("report", a, b, "-o", here / "report"), absent=[here / "report"], watch=[a, b])


def plan_at_a_huge_width(ws, here):
    return Setup(ws.cli("plan", "--config", ws.config, "--set", "model.arch=gpt", "model.width=10000000",
                        "model.head_dim=64"))


def numbers_apart(stdout: str, stderr: str) -> str | None:
    """Two numbers run together print as one token with two decimal points (8940715.988940715.98)."""
    glued = [t for t in stdout.split() if re.search(r"\d\.\d+\.\d", t)]
    return f"numbers run together: {glued[:3]}" if glued else None


# ------------------------------------------------------------------------------ the 24 cases

CASES = [
    Case("1a", "a pickle planted in an FSDP2 (DCP) checkpoint runs on export", "nopickle-dcp",
         planted("fsdp2", ".metadata"), multi_rank=True),
    Case("1b", "a pickle planted in a DeepSpeed checkpoint runs on export", "nopickle-zero",
         planted("deepspeed", "mp_rank_00_model_states.pt"), multi_rank=True),
    Case("2", "`export -o` onto the run's own metrics.jsonl", "overwrite", export_onto_metrics),
    Case("3", "`data prepare --out` into an existing directory", "overwrite", prepare_into_existing),
    Case("4", "a seed of 2^64", "validate", fresh_run("sweep.seeds=[18446744073709551616]")),
    Case("5", "stats.reference_run with another data.seed", "validate", reference_with_other_data_seed),
    Case("6", "a corrupt signature in the reference run", "validate", reference_with_corrupt_signature),
    Case("7", "a full disk (ENOSPC) at a checkpoint", "faults", disk_full_at_checkpoint,
         Expect(names="No space left on device")),
    Case("8", "a read-only XDG_CACHE_HOME (native build: fall back to torch, one warning)", "faults",
         read_only_xdg_cache, Expect(code=0, names="native ops unavailable")),
    Case("9", "a read-only data.cache_dir", "faults", read_only_cache_dir, Expect(names="data.cache_dir")),
    Case("10", "optim.lr=.nan", "validate", fresh_run("optim.lr=.nan")),
    Case("11", "optim.lr=.inf", "validate", fresh_run("optim.lr=.inf")),
    Case("12", "WORLD_SIZE=2 without a launcher", "validate",
         fresh_run("dist.backend=ddp", env={"WORLD_SIZE": "2", "RANK": "0"}, timeout=60)),
    Case("13", "badly typed fields in a checkpoint's meta.json", "nopickle-dcp", typed_meta),
    Case("14", "a metrics.jsonl row that is a JSON array (report)", "faults", metrics_row_array,
         Expect(names="metrics.jsonl:2")),
    Case("15", "a signature file that is not safetensors (report)", "overwrite", signature_not_safetensors,
         Expect(names="step_00000002.safetensors")),
    Case("16", "`report -o` naming an existing file", "overwrite", report_onto_a_file),
    Case("17", "an allocation that fails under a memory limit the planner passed", "faults", memory_limit,
         Expect(names="the planner estimates")),
    Case("18", "resume after the shards were re-prepared with another vocabulary", "validate",
         resume_on_other_vocabulary, Expect(names="vocab")),
    Case("19", "data.tokenizer given for shards", "validate", tokenizer_ignored_for_shards),
    Case("20", "an out_dir inside data.path", "validate", out_dir_inside_data_path),
    Case("21", "checkpoints/latest pointing outside the run (export)", "nopickle-dcp", latest_outside_the_run),
    Case("22", "a deleted metrics.jsonl resumed (says so: refuses, or starts the rows over)", "validate",
         metrics_deleted_then_resumed, Expect(code=(0, 2), names="metrics.jsonl")),
    Case("23", "`report A B` on runs with different probes", "overwrite", report_on_other_probes),
    Case("24", "`fastwidth plan` at width 10^7", "overwrite", plan_at_a_huge_width,
         Expect(code=0, lines=0, check=numbers_apart)),
]


def table(results: dict[str, Result], before: dict[str, Result] | None = None) -> str:
    """The markdown table: per case, exit code, stderr lines, what was left, and whether the
    expectation holds (with `before`: those of the other checkout first)."""
    def cells(r: Result | None, case: Case) -> str:
        if r is None:
            return "| | | |"
        left = "; ".join(r.left) if r.left else "nothing"
        tb = " (traceback)" if r.traceback else ""
        ok = "ok" if not r.failures(case.expect) else "FAILS"
        return f"| {r.code} | {r.lines}{tb} | {left} | {ok} "
    head = "| # | case | owner |" + (" before: exit | lines | left | |" if before is not None else "")
    head += (" after: exit" if before is not None else " exit") + " | lines | left | |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for case in CASES:
        if case.number not in results:
            continue
        row = f"| {case.number} | {case.title} | {case.owner} "
        if before is not None:
            row += cells(before.get(case.number), case)
        rows.append(row + cells(results[case.number], case) + "|")
    return "\n".join(rows)


def run_all(tree: Path, root: Path, only: set[str] | None = None, log=None) -> dict[str, Result]:
    ws, results = Workspace(tree, root), {}
    for case in CASES:
        if only and case.number not in only:
            continue
        t0 = time.time()
        try:
            results[case.number] = run_case(case, ws)
        except Exception as e:  # a setup that fails on this checkout is a row too, not a crash of the table
            results[case.number] = Result(f"setup failed: {str(e).splitlines()[0][:120]}", 0, [], "", str(e))
        if log:
            r = results[case.number]
            log(f"case {case.number}: exit {r.code}, {r.lines} lines, left {r.left or 'nothing'} "
                f"({time.time() - t0:.0f} s) {r.failures(case.expect)}")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", required=True, help="the fastwidth checkout to run the cases against")
    p.add_argument("--before", default=None, help="a second checkout, for a before/after table")
    p.add_argument("--table", action="store_true", help="print the markdown table")
    p.add_argument("--only", default="", help="comma-separated case numbers (e.g. 7,14,1a)")
    p.add_argument("--keep", default=None, help="a directory to keep the cases' files in (default: a tmp one)")
    args = p.parse_args(argv)
    only = {c.strip() for c in args.only.split(",") if c.strip()} or None
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="fault-matrix-") as tmp:
        root = Path(args.keep or tmp)
        before = run_all(Path(args.before), root / "before", only, log) if args.before else None
        after = run_all(Path(args.tree), root / "tree", only, log)
    if args.table:
        print(table(after, before))
    failing = [n for n, r in after.items() if r.failures(next(c for c in CASES if c.number == n).expect)]
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
