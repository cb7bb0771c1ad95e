"""Tensor-parallel rank and world size of this process (1 / 0 when no group is initialised).

Layers read these at construction to size their shards, so the same model code serves TP=1 and TP=N.
"""
from __future__ import annotations

import torch.distributed as dist


def get_tp_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
