"""The process group's backend string for each (CUDA available, train.device, engine, offload)."""
import pytest
import torch

from fastwidth.config import load_config
from fastwidth.parallel.env import collective_backend


@pytest.mark.parametrize("cuda_available,device,backend,offload,want", [
    (False, "auto", "fsdp2", True, (False, "gloo")),          # CPU host: gloo only, offload or not
    (False, "auto", "fsdp2", False, (False, "gloo")),
    (False, "auto", "ddp", False, (False, "gloo")),
    (True, "auto", "fsdp2", True, (True, "cpu:gloo,cuda:nccl")),  # offloaded shards: CPU-side clip over gloo
    (True, "auto", "fsdp2", False, (True, "nccl")),
    (True, "auto", "ddp", False, (True, "nccl")),
    (True, "auto", "deepspeed", True, (True, "nccl")),         # ZeRO-3 offload: DeepSpeed's own transfers
    (True, "cpu", "fsdp2", True, (False, "gloo")),             # a GPU host told to train on the CPU
    (False, "cuda", "fsdp2", True, (True, "cpu:gloo,cuda:nccl")),  # train.device=cuda asks for it
])
def test_collective_backend(monkeypatch, cuda_available, device, backend, offload, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    sets = [f"train.device={device}", f"dist.backend={backend}", f"dist.offload_params={str(offload).lower()}"]
    if backend == "deepspeed":
        sets.append("dist.zero_stage=3")
    assert collective_backend(load_config(None, sets)) == want


AGREE = """
import sys, time
sys.path.insert(0, {root!r})
import torch.distributed as dist
from fastwidth.config import load_config, resolve
from fastwidth.parallel.env import agree_on_out_dir, launched_world
cfg = load_config(None, ["dist.backend=ddp", "model.arch=mlp"])
rank = int(__import__("os").environ["RANK"])
cfg = resolve(cfg, now=time.time() + 3600 * rank)   # as if rank 1 had started an hour later
before = cfg.train.out_dir
cfg = agree_on_out_dir(cfg)
# one file per rank: the ranks share one stdout, where two lines can run together under load
line = f"rank {{rank}} world {{launched_world()}} before {{before}} after {{cfg.train.out_dir}}"
with open(f"rank{{rank}}.txt", "w") as f:
    print(line, file=f)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.dist
def test_ranks_agree_on_a_time_stamped_out_dir(tmp_path):
    """The default out_dir carries the time: two ranks that resolve in different seconds (the
    README's torchrun example failed so, now and then) must still write into one directory."""
    import os
    import subprocess
    from pathlib import Path
    from test_dist import BIN, ROOT, free_port
    script = tmp_path / "agree.py"
    script.write_text(AGREE.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1")
    res = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", str(script)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text().strip() for r in (0, 1)]
    assert all(len(l.split()) == 8 and l.startswith(f"rank {r} world 2 ") for r, l in enumerate(lines)), lines
    before = {l.split()[1]: l.split()[5] for l in lines}
    after = {l.split()[1]: l.split()[7] for l in lines}
    assert before["0"] != before["1"]                   # the clocks disagreed ...
    assert after["0"] == after["1"] == before["0"]      # ... and rank 0's name won
    assert Path(after["0"]).parts[0] == "runs" and not (tmp_path / "runs").exists()   # nothing created yet


@pytest.mark.parametrize("keys,replicate,want", [
    (["a", "a", "b", "b"], -1, [[0, 1], [2, 3]]),      # one replica group per node, shards within it
    (["a", "b"], -1, [[0], [1]]),                       # 2 nodes x 1 rank: replicas across the nodes
    (["a", "a", "a", "a"], -1, [[0, 1, 2, 3]]),         # one node: plain FSDP over it
    (["a", "b", "a", "b"], -1, [[0, 2], [1, 3]]),       # ranks numbered across nodes: still by node
    (["a", "b", "a", "b"], 2, [[0, 2], [1, 3]]),
    (["a"] * 4 + ["b"] * 4, 4, [[0, 1], [2, 3], [4, 5], [6, 7]]),  # pairs within each node
    (["a"] * 2 + ["b"] * 2 + ["c"] * 2 + ["d"] * 2, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),  # asked to span nodes
])
def test_hsdp_layout(keys, replicate, want):
    from fastwidth.parallel.nodes import hsdp_layout
    assert hsdp_layout(keys, replicate) == want


def test_hsdp_per_node_needs_equal_nodes():
    from fastwidth.errors import ConfigError
    from fastwidth.parallel.nodes import hsdp_layout
    with pytest.raises(ConfigError, match=r"same rank count on every node, got \[1, 2\]"):
        hsdp_layout(["a", "a", "b"], -1)


def test_hsdp_mesh_follows_the_nodes(monkeypatch):
    """FSDP2's mesh under dist.replicate=-1 when the launcher numbered ranks across nodes (rank 1
    on node b): torch's fake process group, 4 ranks, seen from rank 1."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from fastwidth.parallel import nodes
    from fastwidth.parallel.env import DistEnv
    from fastwidth.parallel.engines import FSDP2Engine
    monkeypatch.setattr(nodes, "node_keys", lambda env: ["a", "b", "a", "b"])
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    try:
        cfg = load_config(None, ["dist.backend=fsdp2", "dist.replicate=-1"])
        mesh = FSDP2Engine(cfg, DistEnv(rank=1, world_size=4, backend="fsdp2", comm="gloo")).mesh
        assert mesh.mesh.tolist() == [[0, 2], [1, 3]]
        assert dist.get_process_group_ranks(mesh.get_group("shard")) == [1, 3]       # node b's ranks
        assert dist.get_process_group_ranks(mesh.get_group("replicate")) == [0, 1]   # one per node
    finally:
        dist.destroy_process_group()


def test_bare_slurm_tasks_point_to_the_sbatch_example(monkeypatch):
    from fastwidth.errors import ConfigError
    from fastwidth.parallel.env import SBATCH_EXAMPLE, init_dist
    from pathlib import Path
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    with pytest.raises(ConfigError) as e:
        init_dist(load_config(None, ["dist.backend=fsdp2"]))
    text = str(e.value)
    assert "\n" not in text and "SLURM_NTASKS=8" in text and SBATCH_EXAMPLE in text and "Past one machine" in text
    root = Path(__file__).resolve().parents[2]
    assert (root / SBATCH_EXAMPLE).is_file() and "\n## Past one machine\n" in (root / "docs/distributed.md").read_text()


def test_replicate_per_node_needs_fsdp2():
    from fastwidth.errors import ConfigError
    from fastwidth.parallel.env import DistEnv
    from fastwidth.parallel.placement import Placement
    with pytest.raises(ConfigError, match="dist.replicate=-1 .* needs dist.backend=fsdp2, got ddp"):
        Placement(load_config(None, ["dist.backend=ddp", "dist.replicate=-1"]), DistEnv(world_size=2, backend="ddp"))
