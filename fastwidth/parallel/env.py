"""The process group: who am I, how many of us, and the one place collectives are set up.

    env = init_dist(cfg)          # DistEnv(rank, world_size, local_rank, device, backend)
    env.is_main                   # rank 0 writes the run directory
    env.barrier(); env.close()

Launchers: torchrun and `deepspeed` both export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT (deepspeed also passes --local_rank, which the CLI accepts and ignores). Plain
`python launch/train.py` with an engine runs as a group of one on a private TCP store, so the
same config (and a checkpoint saved on 2 ranks) also runs on one process. The collective backend
is NCCL on GPUs and gloo on the CPU, both under FSDP2 with offloaded parameters
(collective_backend).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastwidth.errors import ConfigError, UserError

# Test hook: "RANK:STEP" makes that rank SIGKILL itself after finishing optimizer step STEP, as
# a crashed host would (tests/parallel/test_dist.py checks the launch fails loudly, the checkpoint survives).
KILL_ENV = "FASTWIDTH_TEST_KILL"
# The multi-node recipe the SLURM_NTASKS refusal points to (docs/distributed.md, "Past one machine")
SBATCH_EXAMPLE = "launch/slurm/train.sbatch"
# Test hook: that rank behaves as if train.out_dir were on a filesystem only it mounts.
BLIND_ENV = "FASTWIDTH_TEST_PRIVATE_OUT_DIR"


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "none"          # dist.backend of the config
    comm: str = ""                 # gloo | nccl | "" (no process group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return bool(self.comm)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (every rank holds an equal share of the batch, so this is the global mean)."""
        if not self.active or self.world_size == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world_size

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def maybe_die(self, step: int) -> None:
        spec = os.environ.get(KILL_ENV, "")
        if spec and spec == f"{self.rank}:{step}":
            os.kill(os.getpid(), signal.SIGKILL)

    @contextlib.contextmanager
    def guard(self, where: str):
        """Turn a collective failing because another rank died into one clear line."""
        if not self.active:
            yield
            return
        try:
            yield
        except (dist.DistError, RuntimeError) as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            lost = isinstance(e, dist.DistError) or any(k in text.lower() for k in (
                "connection", "peer", "timed out", "gloo", "nccl", "broken pipe"))
            if not lost:
                raise
            raise UserError(f"rank {self.rank}/{self.world_size}: another rank stopped during {where} "
                            f"({text[:160]}); the last complete checkpoint in train.out_dir still loads") from None


def check_shared_dir(env: DistEnv, out_dir) -> None:
    """Every rank must see train.out_dir (checkpoints are written there by all ranks and renamed by
    rank 0): rank 0 writes a token, the others read it. Collective."""
    from pathlib import Path
    if not env.active or env.world_size == 1:
        return
    token = Path(out_dir) / f".fastwidth-shared-{os.environ.get('MASTER_PORT', '0')}"
    created = not token.parent.exists()
    if env.is_main:
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text(str(os.getpid()))
    env.barrier()
    seen = token.is_file() and os.environ.get(BLIND_ENV) != str(env.rank)
    flags = [None] * env.world_size
    dist.all_gather_object(flags, (env.rank, socket.gethostname(), seen))
    env.barrier()
    blind = [f"rank {r} on {h}" for r, h, ok in flags if not ok]
    if env.is_main:
        token.unlink(missing_ok=True)
        if blind and created:
            token.parent.rmdir()  # nothing left behind
    if blind:
        raise UserError(f"train.out_dir {out_dir} is not on a filesystem every rank sees ({', '.join(blind[:4])} "
                        f"cannot read rank 0's files there); put it on a shared filesystem")


def agree_on_out_dir(cfg):
    """A defaulted train.out_dir carries the time (runs/<name>-<UTC time>), so ranks that resolved
    their config in different seconds name different directories (and the shared-filesystem check
    then fails). Joins the process group and returns cfg with rank 0's out_dir. Collective."""
    import dataclasses
    env = init_dist(cfg)
    if not env.active or env.world_size == 1:
        return cfg
    box = [cfg.train.out_dir]
    dist.broadcast_object_list(box, src=0)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=box[0]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What torch's env:// rendezvous reads besides WORLD_SIZE; torchrun and deepspeed set them all.
LAUNCHER_VARS = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_world() -> int:
    """The ranks a launcher started (WORLD_SIZE; 1 without one). WORLD_SIZE > 1 left in the shell
    without a launcher's other variables is one line (it used to train as a group of one or hang)."""
    raw = os.environ.get("WORLD_SIZE", "") or "1"
    try:
        world = int(raw)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw!r} is not a rank count; unset it or start with torchrun / "
                          f"deepspeed") from None
    missing = [var for var in LAUNCHER_VARS if var not in os.environ]
    if world > 1 and missing:
        raise ConfigError(f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          f"not: start the ranks with `torchrun --nproc_per_node {world} launch/train.py ...` or "
                          f"`deepspeed --num_gpus {world} launch/train.py ...`, or unset WORLD_SIZE to train in "
                          f"one process")
    return world


def collective_backend(cfg) -> tuple[bool, str]:
    """(whether ranks compute on CUDA, the process group's backend string) for a config.

    gloo on the CPU, NCCL on GPUs. FSDP2 with dist.offload_params keeps the shards and their
    gradients in host memory, so the gradient clip's norm all-reduce runs over CPU tensors, which
    NCCL cannot reduce: there the group is "cpu:gloo,cuda:nccl" (torch routes each collective by
    its tensors' device). DeepSpeed's ZeRO-3 offload moves data itself and keeps NCCL.
    """
    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if not cuda:
        return False, "gloo"
    if cfg.dist.backend == "fsdp2" and cfg.dist.offload_params:
        return True, "cpu:gloo,cuda:nccl"
    return True, "nccl"


def init_dist(cfg) -> DistEnv:
    """Join (or create) the process group the launcher set up; a plain DistEnv when backend is none."""
    backend = cfg.dist.backend
    world = launched_world()
    tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if tasks > 1 and "WORLD_SIZE" not in os.environ:
        raise ConfigError(f"SLURM_NTASKS={tasks} but no WORLD_SIZE: this would start {tasks} independent runs into "
                          f"one directory; start one torchrun per node under srun, as {SBATCH_EXAMPLE} does "
                          f"(docs/distributed.md, 'Past one machine')")
    if backend == "none":
        if world > 1:
            raise ConfigError(f"launched on {world} ranks but dist.backend is none; set dist.backend to "
                              f"ddp, fsdp2 or deepspeed")
        return DistEnv()
    if cfg.dist.zero_stage and backend != "deepspeed":
        raise ConfigError(f"dist.zero_stage={cfg.dist.zero_stage} needs dist.backend=deepspeed, got {backend}")
    if cfg.dist.offload_optimizer and backend != "deepspeed":
        raise ConfigError("dist.offload_optimizer needs dist.backend=deepspeed (fsdp2 offloads with dist.offload_params)")
    if cfg.dist.offload_params and not (backend == "fsdp2" or (backend == "deepspeed" and cfg.dist.zero_stage == 3)):
        raise ConfigError(f"dist.offload_params needs dist.backend=fsdp2 or deepspeed with zero_stage=3, "
                          f"got {backend} with zero_stage={cfg.dist.zero_stage}")
    cuda, comm = collective_backend(cfg)
    if "RANK" not in os.environ:  # plain python: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cfg.dist.timeout_s)
    if not dist.is_initialized():
        if backend == "deepspeed":
            from fastwidth.parallel.zero import import_deepspeed
            import_deepspeed(cuda).init_distributed(dist_backend=comm, timeout=timeout)
        else:
            dist.init_process_group(comm, timeout=timeout)
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=device,
                   backend=backend, comm=comm)
