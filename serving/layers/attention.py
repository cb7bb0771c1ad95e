"""Attention over the paged KV cache.

`Attention` writes the step's new keys/values into the cache, then hands the query to a backend that
attends over each sequence's cached context. Backends: torch SDPA (CPU, and CUDA without flash-attn),
flash-attn (CUDA, imported lazily) and, on CPU in float32, SDPA for prefills with a native kernel for
decodes (serving/kernels). Sequences in the step's "prefill group" may have several query tokens
(prompt chunks, possibly after a cached prefix); the rest are single-token decodes. With an int8 KV cache
(kv_quant) new entries are quantized as they are written; SDPA dequantizes the blocks it gathers and the
native kernel reads the int8 codes directly.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from serving.kernels import PagedDecodeAttention, paged_decode_attention
from serving.layers import kv_quant
from serving.layers.kv_quant import QuantizedKV
from serving.utils.context import AttentionContext, get_context

logger = logging.getLogger(__name__)


# One layer's cached keys or values: [num_blocks, block_size, KVH, D] in the model dtype, or int8 with scales.
KVCache = torch.Tensor | QuantizedKV


class AttentionBackend(Protocol):
    def __call__(self, q: torch.Tensor, k_cache: KVCache, v_cache: KVCache,
                 ctx: AttentionContext, scale: float) -> torch.Tensor:
        """q: [T, H, D]; caches: [num_blocks, block_size, KVH, D]. Returns [T, H, D]."""


# The gathered keys/values are a step's largest tensors (tens of MB per layer on a big batch). Allocating
# them afresh for every layer and step costs page faults that take far longer than the copy itself on CPU,
# so each thread keeps one buffer per role ("k", "v") and gathers into it (layers run one after another).
_gather_buffers = threading.local()


def _gather_context(cache: KVCache, block_tables: torch.Tensor, role: str) -> torch.Tensor:
    """[num_blocks, bs, KVH, D] gathered by [B, nblk] block tables -> [B, KVH, nblk * bs, D], in attention's
    dtype (an int8 cache is dequantized block by block as it is gathered)."""
    b, nblk = block_tables.shape
    flat = block_tables.reshape(-1)
    pool = _gather_buffers.__dict__
    buffer = pool.get(role)
    if buffer is None or buffer.shape[0] < flat.numel() or buffer.shape[1:] != cache.shape[1:] \
            or buffer.dtype != cache.dtype or buffer.device != cache.device:
        buffer = pool[role] = torch.empty((flat.numel() * 3 // 2 + 1, *cache.shape[1:]), dtype=cache.dtype,
                                          device=cache.device)
    gathered = kv_quant.gather(cache, flat, out=buffer[:flat.numel()])
    return gathered.view(b, nblk * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)


def _sdpa_prefill_plan(ctx: AttentionContext, num_seqs: int, block_size: int) -> list:
    """[(query slice, context length, block_tables, mask)] per prefill sequence, derived once per step.

    Each sequence attends on its own: no padding to the longest prompt, and a chunk that starts at the
    beginning of its context uses SDPA's causal mode, which skips the masked half of the work.
    """
    cu = ctx.cu_seqlens_q[: num_seqs + 1].tolist()
    seq_lens = ctx.seq_lens_k[:num_seqs].tolist()
    plans = []
    for i, k_len in enumerate(seq_lens):
        q_len = cu[i + 1] - cu[i]
        mask = None
        if q_len != k_len:
            # Queries are the last q_len positions: query j sees keys up to k_len - q_len + j.
            k_pos = torch.arange(k_len, device=ctx.seq_lens_k.device)
            q_pos = torch.arange(k_len - q_len, k_len, device=ctx.seq_lens_k.device)
            mask = k_pos[None, :] <= q_pos[:, None]
        block_tables = ctx.block_tables[i:i + 1, :-(-k_len // block_size)].long()
        plans.append((slice(cu[i], cu[i + 1]), k_len, block_tables, mask))
    return plans


# On CPU, decode rows are attended in tiles of a few sequences of similar context length: a tile's gathered
# keys/values are still in the CPU cache when the attention reads them, and each tile is padded only to its
# own longest context instead of the whole batch's. Tiles hold about _DECODE_TILE_BYTES of keys and values.
# On CUDA one tile takes every row: there, more kernel launches would cost more than the padding.
_DECODE_TILE_BYTES = 2 << 20
_DECODE_TILE_MIN_ROWS = 4


def _sdpa_decode_plan(ctx: AttentionContext, first_seq: int, block_size: int, bytes_per_token: int) -> list:
    """[(rows, block_tables, mask)] per tile; rows index the decode group."""
    seq_lens = ctx.seq_lens_k[first_seq:]
    # One host read per step: free on CPU; on CUDA the flash-attn backend avoids it.
    host_lens = seq_lens.tolist()
    order = sorted(range(len(host_lens)), key=host_lens.__getitem__, reverse=True)
    k_pos = torch.arange(-(-ctx.max_seqlen_k // block_size) * block_size, device=seq_lens.device)
    tables = ctx.block_tables[first_seq:]
    tiles, start = [], 0
    while start < len(order):
        nblk = -(-host_lens[order[start]] // block_size)
        count = len(order)
        if seq_lens.device.type == "cpu":
            count = max(_DECODE_TILE_MIN_ROWS, _DECODE_TILE_BYTES // (nblk * block_size * bytes_per_token))
        rows = torch.tensor(order[start:start + count], device=seq_lens.device)
        mask = k_pos[None, :nblk * block_size] < seq_lens[rows, None]                  # [rows, Lk]
        tiles.append((rows, tables[rows, :nblk].long(), mask[:, None, None, :]))
        start += count
    return tiles


def _sdpa_prefill(q: torch.Tensor, k_cache: KVCache, v_cache: KVCache, ctx: AttentionContext,
                  scale: float, out: torch.Tensor) -> None:
    """The prefill group's rows of `out`, one SDPA call per sequence."""
    plans = ctx.derived.get("sdpa_prefill")
    if plans is None:
        plans = ctx.derived["sdpa_prefill"] = _sdpa_prefill_plan(ctx, ctx.num_prefill_seqs, k_cache.shape[1])
    for rows, k_len, block_tables, mask in plans:
        k = _gather_context(k_cache, block_tables, "k")[:, :, :k_len]                     # [1, KVH, Lk, D]
        v = _gather_context(v_cache, block_tables, "v")[:, :, :k_len]
        o = F.scaled_dot_product_attention(q[rows].transpose(0, 1).unsqueeze(0), k, v, attn_mask=mask,
                                           is_causal=mask is None, scale=scale, enable_gqa=True)
        out[rows] = o.squeeze(0).transpose(0, 1)


def _sdpa_decode(q: torch.Tensor, k_cache: KVCache, v_cache: KVCache, ctx: AttentionContext,
                 scale: float, out: torch.Tensor) -> None:
    """The decode rows of `out` (one query token each), tile by tile over gathered contexts."""
    kvh = k_cache.shape[2]
    tiles = ctx.derived.get("sdpa_decode")
    if tiles is None:
        # What a tile holds is the gathered (dequantized) keys and values.
        bytes_per_token = 2 * kvh * k_cache.shape[3] * k_cache.dtype.itemsize
        tiles = ctx.derived["sdpa_decode"] = _sdpa_decode_plan(ctx, ctx.num_prefill_seqs, k_cache.shape[1],
                                                               bytes_per_token)
    # A decode query per head; fold each KV head's query group into the query-length axis, so GQA
    # becomes plain attention over [B, KVH] with no repeated keys.
    qd = q[ctx.num_prefill_tokens:].view(-1, kvh, q.shape[1] // kvh, q.shape[2])      # [B, KVH, G, D]
    od = out[ctx.num_prefill_tokens:].view(qd.shape)
    for rows, block_tables, mask in tiles:
        k = _gather_context(k_cache, block_tables, "k")
        v = _gather_context(v_cache, block_tables, "v")
        o = F.scaled_dot_product_attention(qd.index_select(0, rows), k, v, attn_mask=mask, scale=scale)
        od.index_copy_(0, rows, o)


# (q, k_cache, v_cache, ctx, scale, out): writes the decode rows of `out`.
DecodeAttention = Callable[[torch.Tensor, KVCache, KVCache, AttentionContext, float, torch.Tensor], None]


def _prefill_then(decode: DecodeAttention) -> AttentionBackend:
    """A backend that attends the prefill group through SDPA and the decode rows through `decode`."""

    def backend(q: torch.Tensor, k_cache: KVCache, v_cache: KVCache,
                ctx: AttentionContext, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        if ctx.num_prefill_seqs:
            _sdpa_prefill(q, k_cache, v_cache, ctx, scale, out)
        if ctx.num_prefill_tokens < q.shape[0]:
            decode(q, k_cache, v_cache, ctx, scale, out)
        return out

    return backend


sdpa_backend = _prefill_then(_sdpa_decode)


def cpu_kernel_backend(kernel: PagedDecodeAttention) -> AttentionBackend:
    """Prefill through SDPA (long queries: matrix products pay off), decode rows through the native
    paged-attention kernel, which reads each cached key and value once, in place: float32 entries, or int8
    codes with their scales (float32 queries either way)."""

    def decode(q: torch.Tensor, k_cache: KVCache, v_cache: KVCache, ctx: AttentionContext,
               scale: float, out: torch.Tensor) -> None:
        quantized = isinstance(k_cache, QuantizedKV)
        caches = (k_cache.codes, v_cache.codes, k_cache.params, v_cache.params) if quantized \
            else (k_cache, v_cache)
        if q.dtype != torch.float32 or not (q.is_contiguous() and all(c.is_contiguous() for c in caches)):
            raise ValueError("the CPU attention kernel takes contiguous float32 queries and caches")
        rows = ctx.derived.get("kernel_decode")
        if rows is None:
            seqs = ctx.num_prefill_seqs
            rows = ctx.derived["kernel_decode"] = (ctx.block_tables[seqs:].contiguous(),
                                                   ctx.seq_lens_k[seqs:].contiguous())
        first = ctx.num_prefill_tokens
        kernel(out[first:], q[first:], *caches[:2], *rows, scale, *caches[2:])

    return _prefill_then(decode)


def flash_attn_backend(q: torch.Tensor, k_cache: KVCache, v_cache: KVCache,
                       ctx: AttentionContext, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu_k = ctx.derived.get("cu_seqlens_k")
    if cu_k is None:
        cu_k = ctx.derived["cu_seqlens_k"] = F.pad(ctx.seq_lens_k.cumsum(0, dtype=torch.int32), (1, 0))
    return flash_attn_varlen_func(
        q, k_cache, v_cache, cu_seqlens_q=ctx.cu_seqlens_q, cu_seqlens_k=cu_k,
        max_seqlen_q=ctx.max_seqlen_q, max_seqlen_k=ctx.max_seqlen_k, softmax_scale=scale, causal=True,
        block_table=ctx.block_tables,
    )


def select_backend(name: str, device: torch.device, dtype: torch.dtype, block_size: int,
                   kv_cache_dtype: str = "auto") -> tuple[str, AttentionBackend]:
    """(name, backend) for a configured name. auto: flash-attn on CUDA when installed, the block size suits
    its paged kernel and the KV cache is in the model dtype; on CPU in float32 the native decode kernel when
    it builds here (float or int8 KV); else SDPA (which dequantizes an int8 cache block by block)."""
    kernel_fits = device.type == "cpu" and dtype == torch.float32
    if name == "cpu_kernel" or (name == "auto" and kernel_fits):
        kernel = paged_decode_attention() if kernel_fits else None
        if kernel is not None:
            return "cpu_kernel", cpu_kernel_backend(kernel)
        if name == "cpu_kernel":
            raise ValueError("attention_backend='cpu_kernel' needs a float32 CPU model and a C compiler with "
                             "OpenMP (see the log for the build error)")
    flash_ok = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if name == "flash_attn" and not flash_ok:
        raise ValueError("attention_backend='flash_attn' needs CUDA and the flash-attn package ([gpu] extra)")
    if name == "flash_attn" and kv_cache_dtype != "auto":
        # flash-attn's paged kernel reads the cache in the query dtype and has no per-token scales.
        raise ValueError(f"attention_backend='flash_attn' does not support kv_cache_dtype={kv_cache_dtype!r}: "
                         "use attention_backend='sdpa' (or 'auto') with an int8 KV cache")
    if name == "sdpa" or not flash_ok:
        return "sdpa", sdpa_backend
    if kv_cache_dtype != "auto":
        logger.info("flash-attn cannot read a %s KV cache; using SDPA", kv_cache_dtype)
        return "sdpa", sdpa_backend
    if block_size % 256:
        # flash-attn's paged varlen kernel takes pages of 256 tokens or multiples.
        if name == "flash_attn":
            raise ValueError(f"attention_backend='flash_attn' needs block_size % 256 == 0, got {block_size}")
        logger.info("flash-attn needs block_size %% 256 == 0 (got %d); using SDPA", block_size)
        return "sdpa", sdpa_backend
    return "flash_attn", flash_attn_backend


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.backend: AttentionBackend = sdpa_backend
        # Assigned by the ModelRunner: views into its one KV allocation, [num_blocks, block_size, KVH, D]
        # in the model dtype, or int8 codes with their scales (QuantizedKV).
        self.k_cache: KVCache = torch.empty(0)
        self.v_cache: KVCache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] -> [T, H * D]."""
        ctx = get_context()
        kv_quant.write(self.k_cache, k, ctx.slot_mapping)
        kv_quant.write(self.v_cache, v, ctx.slot_mapping)
        out = self.backend(q, self.k_cache, self.v_cache, ctx, self.scale)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
