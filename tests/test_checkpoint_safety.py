"""Checkpoints are read without running code (issue 29, cases 1, 13, 21), on fabricated
directories in one process: a file that would need unpickling is refused in one line before any
loader sees it, meta.json's fields are type-checked, and `latest` stays inside checkpoints/.
Real FSDP2 checkpoints with a planted payload: tests/parallel/test_safe_checkpoints.py."""
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastwidth.errors import CheckpointError
from fastwidth.run import checkpoint as ckpt


class Payload:
    """Unpickling it writes the marker file: the proof that a loader ran the checkpoint's code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def plant(where: Path, marker: Path) -> None:
    where.write_bytes(pickle.dumps(Payload(marker)))


def saved(tmp_path) -> Path:
    """A one-member checkpoint in the single-process format; returns its directory."""
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    member = SimpleNamespace(name="w3_s0", width=3, seed=0, step=1, model=lin, optimizer=opt)
    return ckpt.save_checkpoint(tmp_path / "checkpoints", 1, [member], {})


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("planted", [".metadata", "__0_0.distcp", "extra.pt", "pytorch_model.bin", "state.pkl",
                                     "notes.txt", "engine/w3_s0/.metadata"])
def test_a_planted_file_of_any_format_is_refused_naming_it(tmp_path, planted):
    path = saved(tmp_path)
    marker = tmp_path / "marker"
    (path / planted).parent.mkdir(parents=True, exist_ok=True)
    plant(path / planted, marker)
    with pytest.raises(CheckpointError) as e:
        ckpt.read_checkpoint(path)
    msg = one_line(e)
    assert str(path / planted) in msg and "--trust-checkpoint" in msg and "safetensors and JSON" in msg
    assert not marker.exists()
    assert ckpt.read_checkpoint(path, trust=True)["step"] == 1   # trusted: read as before (the file is not listed)
    pickle.loads((path / planted).read_bytes())                  # the payload is live: it would have run
    assert marker.read_text() == "ran"


def test_the_checkpointer_refuses_before_the_engine_loads_unless_trusted(tmp_path):
    from test_checkpointer import setup
    from fastwidth.trainer.checkpointer import Checkpointer
    cfg, _, members = setup(tmp_path)
    root = tmp_path / "run" / "checkpoints"
    path = Checkpointer(cfg, members[0].engine, members, root).save(final=True)
    meta = ckpt.read_checkpoint(path)
    plant(path / "extra.pt", tmp_path / "marker")
    with pytest.raises(CheckpointError, match="extra.pt is not a safetensors or JSON file"):
        Checkpointer(cfg, members[0].engine, members, root).load_members(meta)
    cfg.train.trust_checkpoint = True
    Checkpointer(cfg, members[0].engine, members, root).load_members(meta)
    assert not (tmp_path / "marker").exists()


def test_an_unlisted_safetensors_file_and_a_link_are_refused(tmp_path):
    path = saved(tmp_path)
    (path / "model.w3_s0.safetensors").rename(path / "stray.safetensors")
    (path / "model.w3_s0.safetensors").symlink_to(path / "stray.safetensors")
    with pytest.raises(CheckpointError, match="model.w3_s0.safetensors is not a safetensors or JSON file"):
        ckpt.read_checkpoint(path)
    (path / "model.w3_s0.safetensors").unlink()
    (path / "stray.safetensors").rename(path / "model.w3_s0.safetensors")
    (path / "extra.safetensors").write_bytes((path / "model.w3_s0.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="extra.safetensors is not listed in its meta.json"):
        ckpt.read_checkpoint(path)


def test_a_listed_file_replaced_by_a_pickle_fails_its_checksum_before_loading(tmp_path):
    path = saved(tmp_path)
    marker = tmp_path / "marker"
    plant(path / "optim.w3_s0.safetensors", marker)
    with pytest.raises(CheckpointError, match="optim.w3_s0.safetensors is truncated or corrupt"):
        ckpt.read_checkpoint(path)
    assert not marker.exists()


def rewrite_meta(path: Path, edit) -> None:
    meta = json.loads((path / ckpt.META).read_text())
    edit(meta)
    (path / ckpt.META).write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(step="20"), "field step must be an integer"),
    (lambda m: m.update(step=True), "field step must be an integer"),
    (lambda m: m.update(members={"w3_s0": {}}), "field members must be a non-empty list"),
    (lambda m: m.update(members=["w3_s0"]), r"field members\[0\] must be an object"),
    (lambda m: m["members"][0].update(name=7), r"field members\[0\].name must be a model name"),
    (lambda m: m["members"][0].update(name="../../etc"), r"field members\[0\].name must be a model name"),
    (lambda m: m["members"][0].update(width=3.5), r"field members\[0\].width must be an integer"),
    (lambda m: m["members"][0].pop("seed"), r"field members\[0\].seed must be an integer"),
    (lambda m: m["members"][0].update(step=None), r"field members\[0\].step must be an integer"),
    (lambda m: m["members"][0].update(optimizer=[]), r"field members\[0\].optimizer must be an object"),
    (lambda m: m.update(files=[]), "field files must be an object"),
    (lambda m: m["files"].update({"model.w3_s0.safetensors": 5}), "must be a sha256 of 64 hex digits"),
    (lambda m: m["files"].update({"../x.safetensors": "0" * 64}), "must be a path inside the checkpoint"),
    (lambda m: m.update(engine="fsdp2"), "field engine must be an object"),
    (lambda m: m.update(engine={"backend": "fsdp2", "world_size": "2", "zero_stage": 0}),
     "field engine must be an object"),
])
def test_badly_typed_meta_fields_are_named_in_one_line(tmp_path, edit, field):
    path = saved(tmp_path)
    rewrite_meta(path, edit)
    with pytest.raises(CheckpointError, match=field) as e:
        ckpt.read_checkpoint(path)
    assert str(path / ckpt.META) in one_line(e)


@pytest.mark.parametrize("pointer", ["../outside", "/tmp", "step_000001/../../outside", "step_9/..", "link"])
def test_latest_naming_anything_but_a_step_directory_inside_is_refused(tmp_path, pointer):
    path = saved(tmp_path / "run")
    root = path.parent
    outside = tmp_path / "outside"
    outside.mkdir()
    if pointer == "link":
        (root / "step_000002").symlink_to(outside, target_is_directory=True)
        pointer = "step_000002"
    (root / "latest").write_text(pointer + "\n")
    with pytest.raises(CheckpointError, match="outside") as e:
        ckpt.latest_checkpoint(root)
    assert f"{root / 'latest'} names" in one_line(e)


def test_latest_naming_a_step_directory_inside_is_followed(tmp_path):
    path = saved(tmp_path)
    assert ckpt.latest_checkpoint(path.parent) == path
    (path.parent / "latest").write_text("step_000009\n")          # gone: the newest one there
    assert ckpt.latest_checkpoint(path.parent) == path
