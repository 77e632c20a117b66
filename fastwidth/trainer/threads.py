"""train.threads: how many torch CPU threads this process runs.

    n, why = auto_threads()          # train.threads=auto
    set_threads(cfg.train.threads)   # 0 leaves torch's default, an int sets it, auto picks

auto counts the cores this process may run on (os.sched_getaffinity: a cgroup or taskset limit,
not the machine's count), shares them among the node's local ranks (LOCAL_WORLD_SIZE), and takes
off the 1-minute load average, the runnable threads of the other processes. OpenMP workers
busy-wait for work between ops: on a 2-core machine with other processes running, two workers
spin against them and a small model's step ran 50x slower than with one thread.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("fastwidth.trainer")


def usable_cores() -> int:
    """Cores this process may run on, divided among the local ranks of a launch."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(local, 1))


def auto_threads(cores: int | None = None, load: float | None = None) -> tuple[int, str]:
    """(threads, the reason in words): usable cores less the load, rounded, in [1, cores]."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    busy = load / max(local, 1)  # the load, shared out like the cores
    n = max(1, min(cores, int(cores - busy + 0.5)))
    return n, f"{cores} usable cores, load average {load:.2f}"


def set_threads(setting) -> int:
    """Apply train.threads (0: torch's default; an int; "auto"); returns the thread count."""
    if setting == "auto":
        n, why = auto_threads()
        log.info("train.threads=auto: %d thread%s (%s)", n, "" if n == 1 else "s", why)
        torch.set_num_threads(n)
    elif setting:
        torch.set_num_threads(int(setting))
    return torch.get_num_threads()
