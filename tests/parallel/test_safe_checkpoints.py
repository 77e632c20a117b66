"""A real FSDP2 checkpoint (2 CPU ranks) runs no code on export, load_model or resume (issue 29,
case 1): it holds only safetensors and JSON, each listed with its sha256; a pickle payload planted
in it (a new file, or one of its files replaced) is refused in one line by all three readers and
never runs; a checkpoint of the previous version (torch's pickled DCP files) is refused the same
way and loads under --trust-checkpoint. Fabricated directories: tests/test_checkpoint_safety.py."""
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import fastwidth
from fastwidth.errors import CheckpointError
from fastwidth.run import checkpoint as ckpt
from test_dist import ROOT, launch, losses, rel_err, rewind  # tests/parallel is on sys.path (rootdir import mode)
from tests.test_checkpoint_safety import Payload  # the repository root is on sys.path (tests/conftest.py)

pytestmark = [pytest.mark.dist, pytest.mark.slow]
CONFIG = {"model": {"arch": "gpt", "depth": 1, "head_dim": 8, "width": 16}, "param": {"base_width": 16},
          "data": {"source": "stdlib", "seq_len": 8, "batch_size": 8, "probe_size": 4},
          "train": {"steps": 4, "progress": False, "log_every": 1, "ckpt_every": 2, "threads": 1, "report": False},
          "stats": {"every": 4, "sharpness_iters": 0, "ntk_points": 0, "kernel_points": 8}}
MEMBER = "w16_s0"
# the previous version's writer: torch.distributed.checkpoint's default storage (a pickled
# .metadata beside .distcp files) and no file listed in meta.json
LEGACY_TRAIN = """
import sys
sys.path.insert(0, {root!r})
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from fastwidth.cli import main
from fastwidth.parallel.engines import Engine
from fastwidth.run import checkpoint as ckpt


def save_member(self, h, where):
    msd, osd = get_state_dict(h.model, h.optimizer)
    dcp.save({{"model": msd, "optim": osd}}, checkpoint_id=str(where))


Engine.save_member = save_member
ckpt.file_digests = lambda directory: {{}}
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """(tmp, config file, a 2-rank fsdp2 run, the same written by the previous version)."""
    tmp = tmp_path_factory.mktemp("safe")
    cfg = {**CONFIG, "data": {**CONFIG["data"], "cache_dir": str(tmp / "cache")}}
    cfg_file = tmp / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    launch("torchrun", ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={tmp / 'fsdp2'}", "dist.backend=fsdp2"])
    legacy_script = tmp / "legacy_train.py"
    legacy_script.write_text(LEGACY_TRAIN.format(root=str(ROOT)))
    launch("torchrun", legacy_script, cfg_file, [f"train.out_dir={tmp / 'legacy'}", "dist.backend=fsdp2"])
    return tmp, cfg_file, tmp / "fsdp2", tmp / "legacy"


def export_cli(run: Path, out: Path, *flags) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fastwidth.cli", "export", str(run), "-o", str(out), *flags],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def resume(cfg_file: Path, run: Path, *sets, check=False) -> subprocess.CompletedProcess:
    return launch("python", ROOT / "launch" / "train.py", cfg_file,
                  [f"train.out_dir={run}", "train.resume=true", "dist.backend=fsdp2", *sets], check=check)


def refused_in_one_line(res: subprocess.CompletedProcess, names: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert names in lines[0] and "Traceback" not in res.stderr


def test_an_fsdp2_checkpoint_holds_only_listed_safetensors_and_json(work):
    _, _, run, _ = work
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    meta = ckpt.read_checkpoint(latest)                          # every file's sha256 verified
    files = sorted(f.relative_to(latest).as_posix() for f in latest.rglob("*") if f.is_file())
    assert files == sorted([*meta["files"], ckpt.META]), files
    assert all(f.endswith((".safetensors", ".json")) for f in files), files
    assert len([f for f in files if f.endswith(".safetensors")]) == 2   # one per rank
    assert meta["tensors"] == {}                                 # a sharded checkpoint is verified, not loaded


@pytest.mark.parametrize("how", ["added", "replaced"])
def test_a_planted_payload_is_refused_by_export_load_model_and_resume(work, how):
    tmp, cfg_file, run, _ = work
    planted = shutil.copytree(run, tmp / f"planted-{how}")
    marker = tmp / f"marker-{how}"
    member = planted / "checkpoints" / "step_000004" / "engine" / MEMBER
    victim = member / ".metadata" if how == "added" else next(member.glob("shard-*.safetensors"))
    victim.write_bytes(pickle.dumps(Payload(marker)))
    rel = victim.name
    refused_in_one_line(export_cli(planted, tmp / f"{how}.safetensors"), rel)
    assert not (tmp / f"{how}.safetensors").exists()
    with pytest.raises(CheckpointError, match=rel):
        fastwidth.load_model(planted, MEMBER)
    refused_in_one_line(resume(cfg_file, planted, "train.steps=6"), rel)
    assert not marker.exists()
    pickle.loads(victim.read_bytes())                            # the payload is live: it would have run
    assert marker.read_text() == "ran"


def test_a_previous_version_checkpoint_is_refused_and_loads_when_trusted(work):
    tmp, cfg_file, run, legacy = work
    refused_in_one_line(export_cli(legacy, tmp / "legacy.safetensors"), ".metadata is not a safetensors or JSON")
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        fastwidth.load_model(legacy, MEMBER)
    refused_in_one_line(resume(cfg_file, rewind(legacy, tmp / "legacy-refused", 2)), ".metadata")

    res = export_cli(legacy, tmp / "legacy.safetensors", "--trust-checkpoint")
    assert res.returncode == 0, res.stderr[-3000:]
    new = tmp / "new.safetensors"
    assert export_cli(run, new).returncode == 0                  # the new format, read with no process group
    got, want = load_file(str(tmp / "legacy.safetensors")), load_file(str(new))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    state = fastwidth.load_model(legacy, MEMBER, trust_checkpoint=True).state_dict()
    assert set(want) <= set(state) and all(torch.equal(state[k], want[k]) for k in want)

    again = rewind(legacy, tmp / "legacy-trusted", 2)            # resumed on 1 rank from the 2-rank step 2
    resume(cfg_file, again, "--trust-checkpoint", check=True)    # the flag of launch/train.py
    assert rel_err(losses(run), losses(again)) < 1e-4
