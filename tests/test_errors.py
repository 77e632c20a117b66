"""Every mistake a new user makes is one line and exit code 2, leaves nothing behind that blocks
the corrected command, and the README's examples run as written (with tiny step counts)."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastwidth.cli import main

ROOT = Path(__file__).resolve().parents[1]
# the default data cache, fixed here: a test that moves HOME must not re-tokenize the corpus
CACHE = Path.home() / ".cache" / "fastwidth"
TINY = ["model.depth=1", "model.head_dim=8", "param.base_width=16", "data.seq_len=16", "data.batch_size=4",
        "data.probe_size=4", "sweep.seeds=[0]", "train.steps=2", "stats.every=1", "train.progress=false",
        "train.report=false", "stats.kernel_points=0"]


def one_line_error(capsys, argv, needle):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err[-2000:])
    assert err.count("\n") == 0 and err.startswith("fastwidth: error:") and needle in err, err
    return err


def train_argv(tmp_path, *extra):
    return ["train", "--config", "demo", "--set", *TINY, "sweep.widths=[16,32]", f"data.cache_dir={CACHE}", *extra]


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if "cache" not in p.parts)


def test_trace_entk_of_a_language_model_is_refused(tmp_path, capsys):
    one_line_error(capsys, train_argv(tmp_path, f"train.out_dir={tmp_path / 'run'}", "stats.ntk_output=trace"),
                   "stats.ntk_output=trace is for classifiers")
    assert not (tmp_path / "run").exists()


def test_out_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    one_line_error(capsys, train_argv(tmp_path, f"train.out_dir={tmp_path / 'afile' / 'run'}"),
                   "is a file, not a directory")
    assert listing(tmp_path) == ["afile"]


def test_out_dir_not_writable(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes anywhere a permission bit allows; /proc refuses even root
        target, needle = "/proc/fastwidth-test/run", "cannot be made"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target, needle = str(locked / "run"), "not writable"
    one_line_error(capsys, train_argv(tmp_path, f"train.out_dir={target}"), needle)


def test_missing_reference_run_leaves_nothing_and_the_corrected_command_runs(tmp_path, capsys):
    out = tmp_path / "runs" / "new"
    one_line_error(capsys, train_argv(tmp_path, f"train.out_dir={out}", f"stats.reference_run={tmp_path / 'nope'}"),
                   "stats.reference_run")
    assert not (tmp_path / "runs").exists()  # not even the parent it made
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    one_line_error(capsys, train_argv(tmp_path, f"train.out_dir={existing}", f"stats.reference_run={tmp_path / 'nope'}"),
                   "stats.reference_run")
    assert listing(existing) == ["notes.txt"]  # what was there stays, what setting up made is gone
    assert main(train_argv(tmp_path, f"train.out_dir={out}")) == 0


def test_out_dir_expands_the_home_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(train_argv(tmp_path, "train.out_dir=~/runs/x")) == 0
    assert (tmp_path / "home" / "runs" / "x" / "config.yaml").is_file()
    assert not Path("~").exists()


@pytest.mark.parametrize("argv,needle", [
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["train"], "the following arguments are required: --config"),
    (["train", "--config", "nosuch"], "neither a file nor a shipped config (complexity/teacher_student, demo,"),
    (["train", "--config", "demo", "--set", "train.resume=maybe"], "train.resume: 'maybe' is not one of False, True, auto"),
    (["train", "--config", "demo", "--set", "train.ckpt_minutes=-1"], "train.ckpt_minutes: -1.0 is below the minimum"),
    (["export", "nowhere", "-o", "x.safetensors"], "export: nowhere does not exist"),
    (["mup-table", "--config", "demo", "--bsh", "/nonexistent-dir/x.bsh"], "does not exist"),
    (["report", "nowhere", "-o", "r"], "nowhere is not a run directory"),
    (["coord-check", "--config", "demo", "--widths", "16,3o"], "'3o' is not a positive integer"),
], ids=["command", "no-config", "config-name", "resume", "ckpt-minutes", "export-run", "bsh-dir", "report-run",
        "coord-widths"])
def test_usage_mistakes_are_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, argv, needle)
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- the README's examples

def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Running\n+```\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines() if line.strip()]


def tiny_version(argv: list[str], run_dir: str) -> list[str]:
    """The example with tiny step counts (appended overrides win) and a real run for `report`."""
    if "launch/train.py" in argv or argv[:2] in (["fastwidth", "train"], ["fastwidth", "demo"]):
        return argv + ["--set", *TINY]
    if argv[:2] == ["fastwidth", "coord-check"]:
        return argv + ["--steps", "1", "--seeds", "1", "--set", "data.seq_len=16", "data.batch_size=4"]
    if argv[:2] == ["fastwidth", "report"]:
        return ["fastwidth", "report", run_dir] + argv[3:]
    return argv


@pytest.mark.slow
@pytest.mark.dist
def test_readme_examples_run_as_written(tmp_path, monkeypatch):
    examples = readme_examples()
    assert len(examples) >= 8 and examples[0].startswith("python launch/train.py --config configs/demo.yaml")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "launch", tmp_path / "launch")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FASTWIDTH_TEST_THREADS": "1", "OMP_NUM_THREADS": "1"}
    for example in examples:
        argv = shlex.split(example)
        if argv[0] in ("torchrun", "deepspeed"):  # the launchers installed beside this interpreter
            argv[0] = str(Path(sys.executable).parent / argv[0])
        argv = tiny_version(argv, str(tmp_path / "runs" / "long"))
        if argv[0] == "fastwidth":  # in this process (the console script is fastwidth.cli.main)
            monkeypatch.chdir(tmp_path)
            assert main(argv[1:]) == 0, f"README example failed: {example}"
            continue
        if argv[0] == "python":
            argv[0] = sys.executable
        res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"README example failed: {example}\n{res.stderr[-3000:]}"
