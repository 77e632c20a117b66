"""`fastwidth report` on inputs a user gets wrong (issue 29, cases 15, 16 and 23): a signature that is
not safetensors, an -o that exists or is a run's own file, runs evaluated on different probes.
In-process through the CLI's main() on tiny hand-made run directories."""
import hashlib
import json

import torch
import yaml
from safetensors.torch import save_file

from fastwidth.cli import main
from fastwidth.run import RunDir


def tiny_run(path, probe_seed=0):
    """Two widths, one seed, evaluations at steps 3 and 6, and the probe split a run keeps (none
    with probe_seed=None)."""
    run = RunDir(path)
    run.root.mkdir(parents=True)
    run.config.write_text(yaml.safe_dump({"param": {"kind": "mup"}, "sweep": {"widths": [16, 32], "seeds": [0]}}))
    rows = [{"kind": kind, "step": step, "tokens": 4 * step, "width": w, "seed": 0,
             **({"loss": 3.0 - step / 10} if kind == "train" else {"probe_loss": 3.1 - step / 10})}
            for step in (3, 6) for w in (16, 32) for kind in ("train", "eval")]
    rows.append({"kind": "run", "step": 6, "tokens": 24, "width": 0, "seed": 0, "wall_s": 1.0})
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if probe_seed is None:
        return run
    g = torch.Generator().manual_seed(probe_seed)
    save_file({"x": torch.randint(0, 256, (2, 8), generator=g), "y": torch.randint(0, 256, (2, 8), generator=g)},
              str(run.probe))
    return run


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and all(n in err for n in needles), err


def test_a_signature_that_is_not_safetensors_is_one_line_naming_it(tmp_path, capsys):
    run = tiny_run(tmp_path / "run", probe_seed=None)  # the report tells the probe by the signatures then
    bad = run.signature("w16_s0", 6)            # the final evaluation's: the figures read it too
    bad.parent.mkdir(parents=True)
    bad.write_text("not safetensors\n")
    assert main(["report", str(run.root), "-o", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, str(bad))
    assert not (tmp_path / "out").exists()


def test_report_refuses_an_existing_output_and_force_replaces_it_whole(tmp_path, capsys):
    run = tiny_run(tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    assert main(["report", str(run.root), "-o", str(out)]) == 2
    _one_line_error(capsys, str(out), "--force")
    assert [p.name for p in out.iterdir()] == ["notes.md"]
    assert main(["report", str(run.root), "-o", str(out), "--force"]) == 0
    assert (out / "summary.md").is_file() and (out / "loss.png").is_file() and not (out / "notes.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no temporary or set-aside copy left


def test_report_never_writes_a_runs_own_files_even_with_force(tmp_path, capsys):
    run = tiny_run(tmp_path / "run")
    before = hashlib.sha256(run.config.read_bytes()).hexdigest()
    for target in (run.config, run.root, run.checkpoints):
        for force in ([], ["--force"]):
            assert main(["report", str(run.root), "-o", str(target), *force]) == 2
            _one_line_error(capsys, str(target), str(run.root))
    assert hashlib.sha256(run.config.read_bytes()).hexdigest() == before and not run.checkpoints.exists()


def test_runs_on_different_probes_are_refused_or_drawn_apart(tmp_path, capsys, caplog):
    a, b = tiny_run(tmp_path / "a", probe_seed=0), tiny_run(tmp_path / "b", probe_seed=1)
    out = tmp_path / "out"
    assert main(["report", str(a.root), str(b.root), "-o", str(out)]) == 2
    _one_line_error(capsys, str(a.root), str(b.root), "different probe", "--allow-different-probes")
    assert not out.exists()
    assert main(["report", str(a.root), str(b.root), "-o", str(out), "--allow-different-probes"]) == 0
    summary = (out / "summary.md").read_text()
    skipped = [line for line in summary.splitlines() if line.startswith("**Skipped**")]
    assert len(skipped) == 1 and str(a.root) in skipped[0] and str(b.root) in skipped[0]
    assert any("not compared" in r.getMessage() for r in caplog.records)
    assert (out / "loss.png").is_file() and (out / "probe2-b" / "loss.png").is_file()   # each run still drawn
    assert "![probe2-b/loss.png](probe2-b/loss.png)" in summary


def test_runs_on_the_same_probe_are_one_group(tmp_path):
    from fastwidth.report.cli import probe_groups, skipped_comparisons
    from fastwidth.report.reader import load_run
    runs = [load_run(tiny_run(tmp_path / n, probe_seed=s).root) for n, s in (("a", 0), ("b", 0), ("c", None))]
    groups = probe_groups(runs)
    assert [len(g) for g in groups] == [3] and skipped_comparisons(groups, allowed=False) == []


def test_report_onto_an_existing_file_is_one_line_and_keeps_it(tmp_path, capsys):
    run = tiny_run(tmp_path / "run")
    out = tmp_path / "out"
    out.write_text("mine")
    assert main(["report", str(run.root), "-o", str(out)]) == 2       # main: FileExistsError, a traceback
    _one_line_error(capsys, str(out), "exists", "--force")
    assert out.read_text() == "mine"
