"""Past one machine: two "nodes" on this host (docs/distributed.md, "Past one machine").

Each node is its own launcher process, started concurrently as every node of a cluster runs the
same command: `torchrun --nnodes 2 --node_rank i` meeting at a c10d rendezvous on localhost,
`deepspeed --hostfile H --no_ssh --node_rank i`, and launch/slurm/train.sbatch run with a stand-in
`srun` (one torchrun per node, here both on localhost) and `scontrol`. Every run trains the tiny
config to the end and its losses are compared with one process; HSDP's mesh is read back from
each rank (tests/parallel/groups_and_train.py): shard groups within a node, replicas across nodes.
What cannot run here: deepspeed's ssh launchers (pdsh / ssh to each host) need pdsh and an sshd.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastwidth.run.metrics import read_metrics
from test_dist import BIN, ROOT, TIMEOUT, free_port, launch, losses  # tests/parallel is on sys.path

pytestmark = [pytest.mark.dist, pytest.mark.slow]
CONFIG = {"model": {"arch": "gpt", "depth": 1, "head_dim": 8, "width": 16}, "param": {"base_width": 16},
          "data": {"source": "stdlib", "seq_len": 8, "batch_size": 8, "probe_size": 4},
          "train": {"steps": 6, "progress": False, "log_every": 1},
          "stats": {"every": 6, "sharpness_iters": 0, "ntk_points": 0, "kernel_points": 8}}
SCRIPT = ROOT / "tests" / "parallel" / "groups_and_train.py"
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
# stand-ins for Slurm's tools on PATH: srun runs its command once per node of the job,
# concurrently, as that node (SLURM_NODEID); scontrol expands a comma-separated node list
SRUN = """#!/bin/bash
while [[ $1 == -* ]]; do shift; done   # srun's own options (all --opt=value here)
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" > "$NODE_LOGS/node$i.log" 2>&1 &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
SCONTROL = """#!/bin/bash
[[ $1 == show && $2 == hostnames ]] || { echo "stub scontrol: $*" >&2; exit 1; }
tr ',' '\\n' <<< "$3"
"""


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def run_nodes(cmds: list[list[str]], logs: Path, env=None) -> None:
    """Start one launcher per "node" at once (each with its own log file) and wait for all."""
    logs.mkdir(parents=True, exist_ok=True)
    files = [open(logs / f"node{i}.log", "w") for i in range(len(cmds))]
    procs = [subprocess.Popen(c, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env or clean_env())
             for c, f in zip(cmds, files)]
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p, f in zip(procs, files):
            if p.poll() is None:
                p.kill()
            f.close()
    if any(codes):
        pytest.fail(f"exit codes {codes}\n" + "\n".join(f"--- node {i}\n{(logs / f'node{i}.log').read_text()[-3000:]}"
                                                        for i in range(len(cmds))))


def torchrun_nodes(cfg_file, out, sets, nproc=1, nnodes=2) -> list[list[str]]:
    port = free_port()
    return [[str(BIN / "torchrun"), f"--nnodes={nnodes}", f"--node_rank={i}", f"--nproc_per_node={nproc}",
             "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}", f"--rdzv_id=fw{port}",
             str(SCRIPT), "--config", str(cfg_file), "--set", f"train.out_dir={out}", *sets] for i in range(nnodes)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    cfg = {**CONFIG, "data": {**CONFIG["data"], "cache_dir": str(tmp / "cache")}}
    cfg_file = tmp / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    launch("python", ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={tmp / 'single'}"])
    return tmp, cfg_file, losses(tmp / "single")


def agreement(single: dict, out: Path, what: str) -> None:
    got = losses(out)
    assert set(got) == set(single) and max(s for _, s in single) == CONFIG["train"]["steps"]
    diff = max(abs(got[k] - single[k]) for k in single)
    rel = max(abs(got[k] - single[k]) / abs(single[k]) for k in single)
    print(f"\n{what}: max |loss - one process| = {diff:.2e} ({rel:.2e} relative) over {len(single)} steps")
    assert rel < 1e-4


def layouts(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"layout.rank{r}.json").read_text()) for r in range(world)]


def local_q(out: Path, world: int) -> list[int]:
    """Elements of blocks.0.attn.q.weight each rank holds."""
    held = []
    for r in range(world):
        groups = json.loads((out / f"groups.rank{r}.json").read_text())["w16_s0"]
        held.append({n: c for g in groups for n, c in zip(g["names"], g["local"])}["blocks.0.attn.q.weight"])
    return held


def test_torchrun_two_nodes_ddp(work):
    tmp, cfg_file, single = work
    out = tmp / "ddp"
    run_nodes(torchrun_nodes(cfg_file, out, ["dist.backend=ddp"]), tmp / "ddp-logs")
    agreement(single, out, "torchrun 2 nodes x 1, ddp")
    assert {l["node"] for l in layouts(out, 2)} == {"GROUP_RANK=0", "GROUP_RANK=1"}


@pytest.mark.parametrize("nproc", [1, 2])
def test_torchrun_two_nodes_hsdp(work, nproc):
    """dist.replicate=-1: one replica group per node. 2 nodes x 1 rank: shard groups of one rank
    (each holds all of q), replicated across the nodes; 2 x 2: each node's pair shards q in halves."""
    tmp, cfg_file, single = work
    out, world = tmp / f"hsdp{nproc}", 2 * nproc
    run_nodes(torchrun_nodes(cfg_file, out, ["dist.backend=fsdp2", "dist.replicate=-1"], nproc=nproc),
              tmp / f"hsdp{nproc}-logs")
    agreement(single, out, f"torchrun 2 nodes x {nproc}, HSDP (dist.replicate=-1)")
    lay = layouts(out, world)
    for r, l in enumerate(lay):
        assert r in l["shard"] and r in l["replicate"]
        assert {lay[s]["node"] for s in l["shard"]} == {l["node"]}                   # shards within its node
        assert len({lay[p]["node"] for p in l["replicate"]}) == 2 == len(l["replicate"])  # one replica per node
    assert lay[0]["mesh"] == [list(range(nproc)), list(range(nproc, world))]
    assert local_q(out, world) == [16 * 16 // nproc] * world


def test_deepspeed_hostfile_one_host(work):
    """Any hostfile makes deepspeed first try `ssh HOST hostname` (refused here: no sshd); with
    --no_ssh_check and --master_addr a hostfile of one host takes the local path, its slots
    (filtered by --include) the ranks."""
    tmp, cfg_file, single = work
    out, hostfile = tmp / "ds-local", tmp / "hostfile-local"
    hostfile.write_text("localhost slots=4\n")
    cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--include", "localhost:0,1", "--no_ssh_check",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT),
           "--config", str(cfg_file), "--set", f"train.out_dir={out}", "dist.backend=deepspeed", "dist.zero_stage=1"]
    run_nodes([cmd], tmp / "ds-local-logs")
    assert sorted(p.name for p in out.glob("groups.rank*.json")) == ["groups.rank0.json", "groups.rank1.json"]
    agreement(single, out, "deepspeed --hostfile (localhost slots=4, --include localhost:0,1), ZeRO-1")


def test_deepspeed_hostfile_two_nodes_no_ssh(work):
    """Two hosts in the hostfile, each node started by hand (--no_ssh --node_rank i), as a cluster
    without passwordless ssh runs deepspeed; the host names are only labels here."""
    tmp, cfg_file, single = work
    out, hostfile, port = tmp / "ds-2", tmp / "hostfile-2", str(free_port())
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    cmds = [[str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", f"--node_rank={i}",
             "--master_addr", "127.0.0.1", "--master_port", port, str(SCRIPT), "--config", str(cfg_file),
             "--set", f"train.out_dir={out}", "dist.backend=deepspeed", "dist.zero_stage=2"] for i in (0, 1)]
    run_nodes(cmds, tmp / "ds-2-logs")
    agreement(single, out, "deepspeed --hostfile 2 hosts --no_ssh, ZeRO-2")
    assert {l["node"] for l in layouts(out, 2)} == {"CROSS_RANK=0", "CROSS_RANK=1"}


def test_sbatch_example_on_two_nodes(work, tmp_path):
    """launch/slurm/train.sbatch as Slurm runs it, with srun / scontrol stand-ins that start its
    torchrun once per node on this host: a 2-node HSDP run through launch/train.py."""
    _, cfg_file, single = work
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    stubs, logs, out = tmp_path / "bin", tmp_path / "logs", tmp_path / "run"
    stubs.mkdir()
    logs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = clean_env(PATH=f"{stubs}:{BIN}:{os.environ['PATH']}", NODE_LOGS=str(logs), SLURM_JOB_ID="4242",
                    SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost,localhost",
                    SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE="1", RDZV_PORT=str(free_port()))
    res = subprocess.run(["bash", str(SBATCH), str(cfg_file), "--set", f"train.out_dir={out}", "dist.backend=fsdp2",
                          "dist.replicate=-1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-2000:] + "".join(p.read_text()[-3000:] for p in sorted(logs.glob("*.log")))
    agreement(single, out, "launch/slurm/train.sbatch, 2 nodes x 1 (stub srun), HSDP")
    assert {r["rank"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "memory"} == {0, 1}
    assert (out / "report" / "summary.json").is_file()


def test_bare_srun_is_refused(work, tmp_path):
    """Several Slurm tasks each running launch/train.py (no launcher): one line naming the sbatch
    example and the docs section, exit code 2, nothing trained."""
    _, cfg_file, _ = work
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(cfg_file), "--set",
                          f"train.out_dir={tmp_path / 'run'}", "dist.backend=ddp"],
                         cwd=ROOT, env=clean_env(SLURM_NTASKS="4"), capture_output=True, text=True, timeout=TIMEOUT)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "SLURM_NTASKS=4" in lines[0] and "launch/slurm/train.sbatch" in lines[0] and "Past one machine" in lines[0]
    assert (ROOT / "launch" / "slurm" / "train.sbatch").is_file()
    assert "## Past one machine" in (ROOT / "docs" / "distributed.md").read_text()
    assert not (tmp_path / "run").exists()
