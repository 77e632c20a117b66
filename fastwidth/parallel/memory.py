"""Memory rows: what each rank holds once its models are built, once engines exist, after step 1.

    rec = MemoryRecorder(env, device)        # before the first model is built: the baseline
    rec.mark("built", members)               # collective: every rank calls it at the same point
    rec.mark("ready", members); rec.mark("step", members)
    rec.flush(writer)                        # rank 0 writes one row per (rank, phase)

Row (docs/design.md §5, extended with the baseline):
    {"kind": "memory", "phase": "built"|"ready"|"step", "rank", "host_peak_bytes",
     "device_peak_bytes", "model_bytes", "host_baseline_bytes", "step", "tokens", "width": 0, "seed": 0}
host_peak_bytes is ru_maxrss: the peak resident set of the process over its whole life so far
(Linux reports KiB). So it includes the interpreter, torch, deepspeed and the process group;
host_baseline_bytes is that same peak taken just before the first model is built, and
host_peak_bytes - host_baseline_bytes is what the models, engines and step added (a lower bound
of it when an earlier allocation had pushed the peak higher than the models then needed).
device_peak_bytes is torch.cuda.max_memory_allocated (0 on the CPU). model_bytes is the full
(unsharded) fp32 size of every model this rank trains: the yardstick for "holds under its size".
"""
from __future__ import annotations

import resource

import torch
import torch.distributed as dist

PHASES = ("built", "ready", "step")


def host_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def device_peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return 0


def full_fp32_bytes(tables: list[dict]) -> int:
    """4 bytes per element of every parameter at its global shape (tables: µP side tables)."""
    total = 0
    for table in tables:
        for info in table.values():
            n = 1
            for d in info.shape:
                n *= int(d)
            total += 4 * n
    return total


class MemoryRecorder:
    def __init__(self, env, device: torch.device):
        self.env, self.device = env, device
        self.baseline = host_peak_bytes()
        self.rows: list[dict] = []
        self.done: set[str] = set()

    def mark(self, phase: str, tables: list[dict], step: int = 0, tokens: int = 0) -> None:
        """Measure this rank and gather every rank's numbers (collective under a process group)."""
        if phase in self.done:
            return
        self.done.add(phase)
        mine = {"kind": "memory", "phase": phase, "rank": self.env.rank, "step": step, "tokens": tokens,
                "width": 0, "seed": 0, "host_peak_bytes": host_peak_bytes(),
                "device_peak_bytes": device_peak_bytes(self.device), "model_bytes": full_fp32_bytes(tables),
                "host_baseline_bytes": self.baseline}
        if self.env.active and self.env.world_size > 1:
            every = [None] * self.env.world_size
            dist.all_gather_object(every, mine)
        else:
            every = [mine]
        if self.env.is_main:
            self.rows += every

    def flush(self, writer) -> None:
        for row in self.rows:
            writer.write(row)
        self.rows = []
