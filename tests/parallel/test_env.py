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
