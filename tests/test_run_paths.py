"""run/: the one room that spells a run directory's paths and a member's name.

The scan reads every module of fastwidth outside run/ with ast and fails on a string constant
that spells an entry of the run directory (docs/design.md §5 and run/paths.py's layout). What is
not a path is left alone: docstrings (expression statements), argparse `help=` texts, messages
that only mention a file among other words, CLI names such as the `report` subcommand.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fastwidth.run import MemberSpec, RunDir, member_specs
from fastwidth.run.paths import checkpoint_dirs, checkpoint_name, latest_pointer

PACKAGE = Path(__file__).resolve().parents[1] / "fastwidth"

# entries a whole string, or a part between "/", may not be (meta.json: inside every checkpoint)
ENTRIES = {"metrics.jsonl", "config.yaml", "probe.safetensors", "preact_ranges.json", "checkpoints", "signatures",
           "latest", ".lock", "metrics.csv", "tensorboard", "wandb", "meta.json"}
# fragments of names built with a number: ntk_step_<n>, step_<n> (f-string or glob), .rank<r>
FRAGMENTS = re.compile(r"ntk_step_|(?:^|/)step_(?:$|[*%{])|(?:^|/)\.rank(?:$|[*%{\d])")
# a module outside run/ whose string is not about a run directory, with the reason
NOT_RUN_DIRS = {("fastwidth.data.shards", ".lock"): "the token-shard cache's own lock, in the cache directory"}


def _is_docstring_or_help(node: ast.AST, parents: dict) -> bool:
    parent = parents.get(node)
    if isinstance(parent, ast.JoinedStr):
        parent = parents.get(parent)
    return isinstance(parent, ast.Expr) or (isinstance(parent, ast.keyword) and parent.arg == "help")


def _divides(node) -> bool:
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)


def _spells_entry(node: ast.Constant, parents: dict) -> str | None:
    """The run-directory entry the string constant `node` spells, or None."""
    text = node.value
    parts = text.split("/")
    hit = next((p for p in parts if p in ENTRIES), None)
    if hit is None and FRAGMENTS.search(text):
        hit = FRAGMENTS.search(text).group(0)
    # "report" only as a path part: `x / "report"` or "report/..." ("report" alone is a command)
    if hit is None and "report" in parts and (len(parts) > 1 or _divides(parents.get(node))):
        hit = "report"
    return hit


def spelled_paths(source: str, module: str) -> list[tuple[int, str]]:
    """(line, entry) for every run-directory entry the module's strings spell."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not _is_docstring_or_help(node, parents):
            entry = _spells_entry(node, parents)
            if entry is not None and (module, entry) not in NOT_RUN_DIRS:
                found.append((node.lineno, entry))
    return sorted(found)


def modules_outside_run(package: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(package.rglob("*.py")):
        parts = list(f.relative_to(package.parent).with_suffix("").parts)
        if parts[1:2] != ["run"]:
            out[".".join(p for p in parts if p != "__init__")] = f
    return out


def files_spelling_paths(package: Path) -> dict[str, list[tuple[int, str]]]:
    found = {m: spelled_paths(f.read_text(encoding="utf-8"), m) for m, f in modules_outside_run(package).items()}
    return {m: hits for m, hits in found.items() if hits}


def test_only_run_spells_run_directory_paths():
    assert len(modules_outside_run(PACKAGE)) > 50, "the package was not found"
    found = files_spelling_paths(PACKAGE)
    assert not found, ("run-directory paths spelled outside fastwidth/run/ (use RunDir):\n"
                       + "\n".join(f"  {m}:{line} {entry!r}" for m, hits in found.items() for line, entry in hits))


def test_scanner_catches_planted_spellings(tmp_path):
    copy = tmp_path / "fastwidth"
    for room in ("run", "report"):
        (copy / room).mkdir(parents=True)
    (copy / "run" / "paths.py").write_text('METRICS = "metrics.jsonl"\n')  # run/ may spell them
    (copy / "report" / "planted.py").write_text(
        'from pathlib import Path\n'
        'def f(run, step, rank):\n'
        '    """Reads metrics.jsonl: a docstring is no path."""\n'
        '    a = Path(run) / "metrics.jsonl"\n'
        '    b = Path(run) / "signatures" / "w8_s0" / f"step_{step:08d}.safetensors"\n'
        '    c = Path(run) / f".rank{rank}"\n'
        '    d = Path(run) / "report"\n'
        '    e = f"{run}/checkpoints/latest"\n'
        '    return a, b, c, d, e\n')
    found = files_spelling_paths(copy)
    assert set(found) == {"fastwidth.report.planted"}, found
    assert found["fastwidth.report.planted"] == [(4, "metrics.jsonl"), (5, "signatures"), (5, "step_"),
                                                (6, ".rank"), (7, "report"), (8, "checkpoints")]


@pytest.mark.parametrize("source", ['"""config.yaml in a docstring"""\n',
                                    'p.add_argument("-o", default="out", help="writes RUN/report/")\n',
                                    'sub.add_parser("report")\n',
                                    'raise ValueError(f"{p} is not a run directory (no metrics.jsonl)")\n'])
def test_scanner_leaves_what_is_no_path(source):
    assert spelled_paths(source, "fastwidth.x") == []


def test_report_reads_runs_through_run_not_the_trainer():
    from test_layers import import_graph
    graph = import_graph(PACKAGE)
    found = sorted((a, b) for a, targets in graph.items() if a.startswith("fastwidth.report.")
                   for b in targets if b.startswith("fastwidth.trainer"))
    assert not found, f"report/ imports the trainer: {found}"


def test_run_dir_layout(tmp_path):
    run = RunDir(tmp_path)
    assert run.metrics == tmp_path / "metrics.jsonl" and run.config == tmp_path / "config.yaml"
    assert run.signature("w8_s0", 20) == tmp_path / "signatures" / "w8_s0" / "step_00000020.safetensors"
    assert run.ntk("w8_s0", 20) == tmp_path / "signatures" / "w8_s0" / "ntk_step_00000020.safetensors"
    assert run.checkpoint(7) == tmp_path / "checkpoints" / "step_000007" == run.checkpoints / checkpoint_name(7)
    assert latest_pointer(run.checkpoints) == tmp_path / "checkpoints" / "latest"
    assert run.scratch(1).root == tmp_path / ".rank1" and run.scratch(1).metrics == tmp_path / ".rank1" / "metrics.jsonl"
    assert (run.report, run.lock, run.ranges) == (tmp_path / "report", tmp_path / ".lock",
                                                  tmp_path / "preact_ranges.json")


def test_run_dir_lists_signatures_and_ntk_apart(tmp_path):
    run = RunDir(tmp_path)
    assert run.list_signatures() == {} and run.list_ntk() == {}  # no signatures/ yet
    files = [run.signature("w8_s0", 0), run.signature("w8_s0", 30), run.ntk("w8_s0", 30), run.signature("w16_s1", 0)]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    (run.signatures / "w8_s0" / "step_00000040.tmp").write_bytes(b"")  # a signature being written
    assert run.list_signatures() == {"w16_s1": {0: files[3]}, "w8_s0": {0: files[0], 30: files[1]}}
    assert run.list_ntk() == {"w8_s0": {30: files[2]}}
    for step in (3, 12):
        run.checkpoint(step).mkdir(parents=True)
    (run.checkpoints / ".replaced-step_000001").mkdir()
    assert checkpoint_dirs(run.checkpoints) == [run.checkpoint(3), run.checkpoint(12)]


@pytest.mark.parametrize("spec,name", [(MemberSpec(64, None, 0), "w64_s0"), (MemberSpec(64, 0.001, 3), "w64_lr0.001_s3"),
                                       (MemberSpec(16, 1e-05, 1), "w16_lr1e-05_s1"),
                                       (MemberSpec(32, None, 2, depth=4), "w32_d4_s2"),
                                       (MemberSpec(32, 0.01, 2, depth=4), "w32_d4_lr0.01_s2")])
def test_member_names_and_their_parse(spec, name):
    assert spec.name == name
    assert MemberSpec.parse(name) == spec


@pytest.mark.parametrize("name", ["w64", "64_s0", "w64_s", "w64_lrfast_s0", "w64_s0_extra", "signatures"])
def test_a_name_no_member_has_is_refused(name):
    with pytest.raises(ValueError, match="not a member name"):
        MemberSpec.parse(name)


def test_member_specs_put_the_reference_width_first():
    from fastwidth.config import load_config
    cfg = load_config(None, ["sweep.widths=[32,64,128]", "sweep.reference_width=64", "sweep.seeds=[0,1]",
                             "sweep.lrs=[0.001,0.01]"])
    specs = member_specs(cfg)
    assert [s.width for s in specs] == [64] * 4 + [32] * 4 + [128] * 4
    assert specs[:4] == [MemberSpec(64, 0.001, 0), MemberSpec(64, 0.001, 1), MemberSpec(64, 0.01, 0),
                         MemberSpec(64, 0.01, 1)]
    plain = member_specs(load_config(None, ["sweep.widths=[32,64]", "sweep.seeds=[5]"]))
    assert [s.name for s in plain] == ["w64_s5", "w32_s5"]  # no reference_width: the widest
