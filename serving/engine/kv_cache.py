"""The paged KV cache's memory: bytes per cached token and the one allocation a runner (or a test harness)
hands out to its attention layers as views, with the attention backend that reads it. Sizes are per
tensor-parallel rank: each rank holds its own KV heads.
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from serving.capacity import kv_bytes_per_head_token
from serving.layers import kv_quant
from serving.layers.attention_types import AttentionBackend, KVLayout
from serving.layers.kv_quant import QuantizedKV

if TYPE_CHECKING:
    from serving.layers.attention import Attention


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, kv_cache_dtype: str,
                       model_dtype: torch.dtype) -> int:
    """Bytes one cached token takes: keys and values of every layer, for `num_kv_heads` heads (the formula of
    serving/capacity.py, which plans deployments from a config without building anything)."""
    return 2 * num_layers * num_kv_heads * kv_bytes_per_head_token(head_dim, kv_cache_dtype, model_dtype.itemsize)


@dataclass
class KVCachePool:
    """Every layer's keys and values in one allocation (plus one for the int8 scales)."""

    kv_cache_dtype: str
    num_blocks: int
    block_size: int
    bytes_per_token: int
    entries: torch.Tensor               # [2, layers, blocks, block_size, KVH, D]: model dtype or int8
    params: torch.Tensor | None         # int8: [2, layers, blocks, block_size, KVH, 2] float16

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        """What the allocation really holds (the tests check bytes_per_token against it)."""
        tensors = [self.entries] if self.params is None else [self.entries, self.params]
        return sum(t.numel() * t.element_size() for t in tensors)


def kv_layout(layers: list[Attention], block_size: int, dtype: torch.dtype, device: torch.device,
              max_model_len: int, kv_cache_dtype: str = "auto") -> KVLayout:
    first = layers[0]
    return KVLayout(block_size, first.num_heads, first.num_kv_heads, first.head_dim, dtype, device, max_model_len,
                    kv_cache_dtype)


def attach(layers: list[Attention], backend: AttentionBackend, num_blocks: int, layout: KVLayout) -> KVCachePool:
    """Allocate the pool and give each layer its views and the backend. Zeroed, because attention gathers
    whole blocks and masks the unused slots: garbage there could be NaN (and zero scales dequantize to exact
    zeros)."""
    kvh, head_dim, dtype = layout.num_kv_heads, layout.head_dim, layout.dtype
    shape = (2, len(layers), num_blocks, layout.block_size, kvh)
    quantized = layout.kv_cache_dtype == "int8"
    entries = zeros((*shape, head_dim), torch.int8 if quantized else dtype, layout.device)
    params = zeros((*shape, 2), kv_quant.PARAM_DTYPE, layout.device) if quantized else None
    for i, layer in enumerate(layers):
        layer.backend = backend
        if params is None:
            layer.k_cache, layer.v_cache = entries[0, i], entries[1, i]
        else:
            layer.k_cache = QuantizedKV(entries[0, i], params[0, i], dtype)
            layer.v_cache = QuantizedKV(entries[1, i], params[1, i], dtype)
    return KVCachePool(layout.kv_cache_dtype, num_blocks, layout.block_size,
                       kv_bytes_per_token(len(layers), kvh, head_dim, layout.kv_cache_dtype, dtype), entries,
                       params)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On the CPU an anonymous mapping, whose pages are the kernel's zero pages until first
    written (torch.zeros writes every byte): a pool sized for max_num_seqs full-length sequences costs
    resident memory only for the blocks in use, so the default pool does not take gigabytes on a laptop.
    Not numpy's calloc, which is as lazy but asks for huge pages: with the common THP setting (defrag on
    madvise) each first write then stalled in compaction, 4-7x slower in a write-once sweep over 1 GiB."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    # The tensor holds a reference to the mapping, which is unmapped when the tensor is freed (a mapping
    # cannot be empty: one byte for a zero-size shape).
    mapping = mmap.mmap(-1, max(1, nbytes))
    return torch.frombuffer(mapping, dtype=torch.uint8)[:nbytes].view(dtype).view(shape)
