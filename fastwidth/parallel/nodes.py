"""Which node each rank runs on, and the HSDP mesh laid out by node (dist.replicate).

    keys = node_keys(env)                 # node_key() of every rank (collective)
    rows = hsdp_layout(keys, replicate)   # rows: shard groups; columns: replica groups
"""
from __future__ import annotations

import os
import socket

import torch.distributed as dist

from fastwidth.errors import ConfigError


def node_key() -> str:
    """Which node this process runs on, as its launcher numbers the nodes: torchrun's GROUP_RANK,
    the deepspeed launcher's CROSS_RANK, Slurm's SLURM_NODEID, else the host name. (Two "nodes"
    on one host, as the tests start them, differ here though their host names agree.)"""
    for var in ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID"):
        if os.environ.get(var, "") != "":
            return f"{var}={os.environ[var]}"
    return socket.gethostname()


def node_keys(env) -> list[str]:
    """node_key() of every rank, indexed by rank. Collective."""
    if not env.active or env.world_size == 1:
        return [node_key()]
    keys = [None] * env.world_size
    dist.all_gather_object(keys, node_key())
    return keys


def hsdp_layout(keys: list[str], replicate: int) -> list[list[int]]:
    """The HSDP mesh (dist.replicate) as rows of ranks: row i is shard group i, column j a replica
    group. keys: node_key() of every rank. Ranks are taken node by node (nodes in the order of
    their lowest rank), so with the launchers' numbering (a node's ranks are consecutive) this is
    torch's row-major (replicate, shard) mesh, and shard groups that fit in a node stay in it.
    replicate=-1: one replica group per node (shard within each node, replicate across nodes)."""
    by_node: dict[str, list[int]] = {}
    for rank, key in enumerate(keys):
        by_node.setdefault(key, []).append(rank)
    sizes = sorted({len(r) for r in by_node.values()})
    if replicate == -1:
        if len(sizes) > 1:
            raise ConfigError(f"dist.replicate=-1 (one replica group per node) needs the same rank count on every "
                              f"node, got {sizes}; set dist.replicate to a divisor of {len(keys)}")
        replicate = len(by_node)
    order = [r for ranks in by_node.values() for r in ranks]
    shard = len(keys) // replicate
    return [order[i * shard:(i + 1) * shard] for i in range(replicate)]
