"""block_size=None (auto) made a number, once, where the engine runs: before the block manager, the KV pool and
the tensor-parallel followers (which receive the resolved config) size anything in blocks."""
from __future__ import annotations

import dataclasses

from serving.config import EngineConfig
from serving.layers.attention import SMALL_BLOCK, auto_block_size
from serving.models.loader import resolve_dtype
from serving.utils.device import resolve_device


def resolve_block_size(config: EngineConfig) -> tuple[EngineConfig, str]:
    """The config with its block size a number, and where that number came from (for the log and stats)."""
    if config.block_size is not None:
        return config, "block_size as configured"
    device = resolve_device(config.device)
    block, why = auto_block_size(config.attention_backend, device, resolve_dtype(config.dtype, device),
                                 config.kv_cache_dtype)
    if block > config.max_num_batched_tokens and config.attention_backend == "auto":
        # A step must hold at least one block; a budget that small keeps small blocks (and SDPA).
        block, why = SMALL_BLOCK, f"max_num_batched_tokens={config.max_num_batched_tokens} is under {block}"
    return dataclasses.replace(config, block_size=block), f"auto: {why}"
