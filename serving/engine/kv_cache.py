"""The paged KV cache's memory: bytes per cached token (pure formulas, for the engine and for capacity
planning) and the one allocation a runner hands out to its attention layers as views.

Sizes are per tensor-parallel rank: each rank holds its own KV heads (at least one; with fewer KV heads than
ranks they are replicated, as QKVParallelLinear does) for every layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from serving.layers import kv_quant
from serving.layers.kv_quant import QuantizedKV

if TYPE_CHECKING:
    from serving.layers.attention import Attention

KV_CACHE_DTYPES = ("auto", "int8")


def kv_heads_per_rank(num_kv_heads: int, tensor_parallel_size: int) -> int:
    return max(1, num_kv_heads // tensor_parallel_size)


def bytes_per_head_token(head_dim: int, kv_cache_dtype: str, model_dtype: torch.dtype) -> int:
    """One token's key (or value) of one KV head: head_dim entries, plus scale and zero for int8."""
    if kv_cache_dtype == "int8":
        return head_dim + kv_quant.PARAM_BYTES
    if kv_cache_dtype != "auto":
        raise ValueError(f"invalid kv_cache_dtype={kv_cache_dtype!r}: expected one of {KV_CACHE_DTYPES}")
    return head_dim * model_dtype.itemsize


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, kv_cache_dtype: str,
                       model_dtype: torch.dtype) -> int:
    """Bytes one cached token takes: keys and values of every layer, for `num_kv_heads` heads."""
    return 2 * num_layers * num_kv_heads * bytes_per_head_token(head_dim, kv_cache_dtype, model_dtype)


def model_kv_bytes_per_token(model_config: Any, kv_cache_dtype: str, model_dtype: torch.dtype,
                             tensor_parallel_size: int = 1) -> int:
    """kv_bytes_per_token of one rank for a Hugging Face Llama config (a transformers config or its dict)."""
    get = model_config.get if isinstance(model_config, dict) else lambda key, default=None: getattr(
        model_config, key, default)
    heads = get("num_attention_heads")
    head_dim = get("head_dim") or get("hidden_size") // heads
    kv_heads = kv_heads_per_rank(get("num_key_value_heads") or heads, tensor_parallel_size)
    return kv_bytes_per_token(get("num_hidden_layers"), kv_heads, head_dim, kv_cache_dtype, model_dtype)


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
        return self.capacity_tokens * self.bytes_per_token


def allocate(layers: list[Attention], num_blocks: int, block_size: int, kv_cache_dtype: str,
             dtype: torch.dtype, device: torch.device) -> KVCachePool:
    """Allocate the pool and give each layer its views. Zeroed, because attention gathers whole blocks and
    masks the unused slots: garbage there could be NaN (and zero scales dequantize to exact zeros)."""
    kvh, head_dim = layers[0].num_kv_heads, layers[0].head_dim
    shape = (2, len(layers), num_blocks, block_size, kvh)
    quantized = kv_cache_dtype == "int8"
    entries = torch.zeros(*shape, head_dim, dtype=torch.int8 if quantized else dtype, device=device)
    params = torch.zeros(*shape, 2, dtype=kv_quant.PARAM_DTYPE, device=device) if quantized else None
    for i, layer in enumerate(layers):
        if params is None:
            layer.k_cache, layer.v_cache = entries[0, i], entries[1, i]
        else:
            layer.k_cache = QuantizedKV(entries[0, i], params[0, i], dtype)
            layer.v_cache = QuantizedKV(entries[1, i], params[1, i], dtype)
    return KVCachePool(kv_cache_dtype, num_blocks, block_size,
                       kv_bytes_per_token(len(layers), kvh, head_dim, kv_cache_dtype, dtype), entries, params)
