"""Nothing overwritten without asking (issue 29, cases 2, 3 and 24): export -o, export --format hf -o and
data prepare --out refuse an existing target unless --force, never write a run directory's own files
(not even with --force), and leave nothing half-written when they fail; plan's table stays readable
at any width. In-process through the CLI's main() on tiny hand-made runs."""
import errno
import hashlib
import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fastwidth.cli import main
from fastwidth.parallel.plan import CHOICES
from fastwidth.run import RunDir
from fastwidth.run.checkpoint import save_checkpoint


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with config.yaml, metrics.jsonl and one single-process checkpoint of one member."""
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config.write_text(yaml.safe_dump({"model": {"arch": "mlp"}, "sweep": {"widths": [4], "seeds": [0]}}))
    run.metrics.write_text(json.dumps({"kind": "train", "step": 1, "tokens": 4, "width": 4, "seed": 0, "loss": 1.0}) + "\n")
    model = torch.nn.Linear(3, 4)
    member = SimpleNamespace(name="w4_s0", width=4, seed=0, step=1, model=model,
                             optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    save_checkpoint(run.checkpoints, 1, [member], {})
    run.signatures.mkdir()
    return run


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and all(n in err for n in needles), err
    return err


def test_export_refuses_an_existing_file_and_force_replaces_it(run_dir, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"keep me")
    assert main(["export", str(run_dir.root), "-o", str(out)]) == 2
    _one_line_error(capsys, str(out), "--force")
    assert out.read_bytes() == b"keep me"
    assert main(["export", str(run_dir.root), "-o", str(out), "--force"]) == 0
    assert set(load_file(str(out))) == {"weight", "bias"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "w.safetensors"]  # no temporary left


@pytest.mark.parametrize("own", ["metrics.jsonl", "config.yaml", "checkpoints/step_000001/model.w4_s0.safetensors",
                                 "checkpoints/new.safetensors", "signatures/w4_s0.safetensors", "probe.safetensors"])
def test_export_never_writes_a_runs_own_files_even_with_force(run_dir, capsys, own):
    target = run_dir.root / own
    before = _digest(target) if target.exists() else None
    for force in ([], ["--force"]):
        assert main(["export", str(run_dir.root), "-o", str(target), *force]) == 2
        _one_line_error(capsys, str(target), "own files", str(run_dir.root))
        assert (_digest(target) if target.exists() else None) == before


def test_export_through_a_link_to_a_runs_file_is_refused(run_dir, tmp_path, capsys):
    link = tmp_path / "w.safetensors"
    link.symlink_to(run_dir.metrics)
    before = _digest(run_dir.metrics)
    assert main(["export", str(run_dir.root), "-o", str(link), "--force"]) == 2
    _one_line_error(capsys, "own files")
    assert _digest(run_dir.metrics) == before


def test_a_failed_export_leaves_the_old_file_and_no_temporary(run_dir, tmp_path, monkeypatch):
    from fastwidth.interop.export import export
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"old")

    def disk_full(tensors, path, metadata=None):
        open(path, "wb").write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(OSError):
        export(run_dir.root, out, force=True)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["run", "w.safetensors"]


def test_hf_export_refuses_a_directory_with_files_and_any_run_directory(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["export", str(run_dir.root), "--format", "hf", "--member", "w4_s0", "-o"]
    assert main([*argv, str(out)]) == 2
    _one_line_error(capsys, str(out), "--force")
    assert main([*argv, str(run_dir.root), "--force"]) == 2          # the run directory itself
    _one_line_error(capsys, "is run directory")
    assert main([*argv, str(tmp_path), "--force"]) == 2                # a directory holding a run
    _one_line_error(capsys, "would delete run directory")
    assert (out / "notes.txt").read_text() == "mine" and run_dir.metrics.is_file()


def test_replacing_a_directory_swaps_it_whole_or_not_at_all(tmp_path):
    from fastwidth.run.outputs import check_target, replacing
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with replacing(out, kind="dir") as tmp:
            tmp.mkdir()
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    check_target(out, flag="-o", force=True, kind="dir")
    with replacing(out, kind="dir") as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def _corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    return root


def test_data_prepare_refuses_an_existing_directory_reuses_its_own_shards_and_force_replaces(tmp_path, capsys):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["data", "prepare", "--source", "text", "--path", str(_corpus(tmp_path)), "--out", str(out),
            "--no-progress", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(argv) == 2
    _one_line_error(capsys, str(out), "--force")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main([*argv, "--force"]) == 0 and json.loads(capsys.readouterr().out)["reused"] is False
    assert not (out / "notes.txt").exists() and (out / "manifest.json").is_file()
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["reused"] is True  # the same input: nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus", "shards"]


def test_data_prepare_force_never_deletes_the_corpus(tmp_path, capsys):
    corpus = _corpus(tmp_path)
    argv = ["data", "prepare", "--source", "text", "--path", str(corpus), "--out", str(tmp_path), "--force",
            "--no-progress", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(argv) == 2
    _one_line_error(capsys, "would delete the corpus")
    assert (corpus / "a.txt").is_file()


PLAN = ["plan", "--config", "configs/dist/gpt_16k_8gpu.yaml", "--set", "model.arch=mlp", "data.source=synthetic"]


@pytest.mark.parametrize("width", [10 ** 7, 10 ** 9])
def test_plan_table_columns_stay_apart_at_huge_widths(capsys, width):
    assert main([*PLAN, f"model.width={width}", f"sweep.widths=[{width}]"]) == 0  # an MLP: planned in 0.2 s
    lines = capsys.readouterr().out.splitlines()
    header, rows = lines[2], lines[3:]
    assert header.split()[-2:] == ["widest", "GPT"] and len(rows) >= 8
    assert [r[:len(c.label)] for r, c in zip(rows, CHOICES)] == [c.label for c in CHOICES]
    for row, choice in zip(rows, CHOICES):  # after the label: ten memory columns (numbers), fits, widest GPT
        cells = row[len(choice.label):].split()
        assert len(cells) == 12 and cells[-2] in ("yes", "no") and cells[-1].isdigit(), row
        assert all(float(c) >= 0 for c in cells[:10]), row


def test_plan_of_a_width_torch_cannot_hold_is_one_line(capsys):
    assert main([*PLAN, "model.width=1099511627776", "sweep.widths=[1099511627776]"]) == 2
    _one_line_error(capsys, "model.width=1099511627776", "too wide")
