"""What attention backends share: the cache they read, its geometry, and the backend interface.

A backend is a small object the ModelRunner makes once (serving/layers/attention.py picks it). Per step the
runner asks it for a plan (`plan`), once, before the forward; every Attention layer then calls `forward` with
that plan in the step's context. Buffers a backend reuses across layers and steps belong to the instance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from serving.layers.kv_quant import QuantizedKV
from serving.utils.context import AttentionContext

# One layer's cached keys or values: [num_blocks, block_size, KVH, D] in the model dtype, or int8 with scales.
KVCache = torch.Tensor | QuantizedKV


@dataclass(frozen=True)
class KVLayout:
    """The geometry of one rank's attention: what a backend sizes its plans and buffers by."""

    block_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype          # what attention computes in (an int8 cache dequantizes to it)
    device: torch.device
    max_model_len: int          # the longest context one sequence can have
    kv_cache_dtype: str = "auto"  # what the cache holds: "auto" (the model dtype) or "int8" codes with scales

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @property
    def gathered_bytes_per_token(self) -> int:
        """Keys and values of one token of one layer, gathered (dequantized) for SDPA."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize


class AttentionBackend(Protocol):
    name: str
    # Whether a pure decode step's plan and forward can be captured in a CUDA graph and replayed for any step
    # of the same batch size: they read lengths and block tables only from the context's device tensors (the
    # plan is made from a context whose host-side lengths are upper bounds, max_model_len), with no
    # host-to-device copy and no host sync (serving/engine/cuda_graphs.py).
    graph_safe: bool

    @property
    def workspace_bytes(self) -> int:
        """The most memory the backend's buffers take beside the KV cache (the KV budget counts it)."""

    def plan(self, ctx: AttentionContext) -> Any:
        """The step's plan (masks, gather indices), built from host-side lengths without a device sync."""

    def forward(self, q: torch.Tensor, k_cache: KVCache, v_cache: KVCache, ctx: AttentionContext,
                scale: float) -> torch.Tensor:
        """q: [T, H, D]; caches: [num_blocks, block_size, KVH, D]; `ctx.plan` is this backend's. Returns
        [T, H, D]."""
