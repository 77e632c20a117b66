"""A full disk inside torch's and DeepSpeed's own checkpoint writers, on 2 CPU ranks.

An FSDP2 member goes through torch.distributed.checkpoint (its HuggingFaceStorageWriter), a
DeepSpeed one through torch.save and then parallel/zero_files.py's conversion; a full disk there
reaches the trainer's boundary wrapped (DCP's CheckpointException, or a rank left waiting for
the other). Each rank still ends with the one ResourceError line naming the checkpoint and what
was kept, and the partial .tmp-step_* is removed. The disk is filled by tests/faultfs (no root).
"""
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from fastwidth.run import checkpoint as ckpt

from test_dist import BIN, ROOT, free_port  # tests/parallel is on sys.path (rootdir import mode)

pytestmark = [pytest.mark.dist, pytest.mark.slow]

FAULTFS = ROOT / "tests" / "faultfs"
# the smallest run: a µP MLP on the synthetic teacher, one member; checkpoints at steps 2 and 3
CONFIG = {"model": {"arch": "mlp", "depth": 2}, "param": {"base_width": 16},
          "data": {"source": "synthetic", "in_dim": 8, "num_classes": 4, "batch_size": 8, "probe_size": 8},
          "sweep": {"widths": [32], "seeds": [0]},
          "train": {"steps": 3, "progress": False, "log_every": 1, "ckpt_every": 2, "report": False, "threads": 1},
          "stats": {"enabled": False}}
ENGINES = {"fsdp2": ["dist.backend=fsdp2"], "zero2": ["dist.backend=deepspeed", "dist.zero_stage=2"]}


def launch_on_a_full_disk(tmp: Path, engine: str) -> tuple[subprocess.CompletedProcess, Path]:
    """2 ranks of launch/train.py whose disk fills at the final checkpoint's first write."""
    cfg_file, out = tmp / "mlp.yaml", tmp / engine
    cfg_file.write_text(yaml.safe_dump(CONFIG))
    port = str(free_port())
    launcher = ([str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={port}"] if engine == "fsdp2"
                else [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(FAULTFS)]), OMP_NUM_THREADS="1",
               FASTWIDTH_FAULT_PATH=str(out / "checkpoints"), FASTWIDTH_FAULT_MATCH="step_000003")
    cmd = [*launcher, str(ROOT / "launch" / "train.py"), "--config", str(cfg_file), "--set",
           f"train.out_dir={out}", *ENGINES[engine]]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240), out


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_full_disk_in_the_engines_writer_is_one_line_per_rank_and_no_temporary(tmp_path, engine):
    res, out = launch_on_a_full_disk(tmp_path, engine)
    assert res.returncode != 0
    # the ranks' lines, each whole (two ranks writing at once may share a line of stderr)
    errors = [e.splitlines()[0] for e in res.stderr.split("fastwidth: error:")[1:]]
    ranks = res.stderr.split("torch/distributed/elastic/")[0]  # torchrun's own report of a failed rank follows
    assert "Traceback" not in ranks, res.stderr[-6000:]
    assert len(errors) == 2, res.stderr[-6000:]                      # one line from each rank
    step3, step2 = out / "checkpoints" / "step_000003", out / "checkpoints" / "step_000002"
    for line in errors:
        assert f"cannot write {step3}" in line and "No space left on device" in line, line
        assert f"kept checkpoint {step2}" in line and "train.resume=auto" in line, line
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")] == []
    assert not step3.exists() and ckpt.latest_checkpoint(out / "checkpoints") == step2
    assert json.loads((step2 / ckpt.META).read_text())["step"] == 2
