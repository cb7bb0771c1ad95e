"""Tensor-parallel process groups.

Layers read the rank and world size at construction to size their shards, so the same model code serves
TP=1 (no group) and TP=N. Collectives on tensors use the default group (NCCL on CUDA, gloo on CPU); the
driver's per-step control messages (small pickled objects) always go over a gloo group, so they never
stage through GPU memory.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

_CPU_GROUP: dist.ProcessGroup | None = None
_THREADS_BEFORE: int | None = None


def get_tp_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_tensor_parallel(rank: int, world_size: int, init_method: str, device: torch.device,
                         timeout_s: float = 600.0, store: dist.Store | None = None) -> None:
    """Join the group of `world_size` ranks; every rank calls this with the same `init_method` (or `store`,
    a rendezvous store the caller already holds)."""
    global _CPU_GROUP, _THREADS_BEFORE
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Each rank gets its share of the cores, so N CPU ranks do not oversubscribe the machine.
    _THREADS_BEFORE = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if store is not None:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    else:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    _CPU_GROUP = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD


def get_cpu_group() -> dist.ProcessGroup:
    if _CPU_GROUP is None:
        raise RuntimeError("tensor parallelism is not initialised in this process")
    return _CPU_GROUP


def destroy_tensor_parallel() -> None:
    global _CPU_GROUP, _THREADS_BEFORE
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None
    if _THREADS_BEFORE is not None:
        torch.set_num_threads(_THREADS_BEFORE)
        _THREADS_BEFORE = None
