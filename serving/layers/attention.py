"""Attention over the paged KV cache.

`Attention` writes the step's new keys/values into the cache, then hands the query to a backend that
attends over each sequence's cached context. Backends: torch SDPA (CPU, and CUDA without flash-attn) and
flash-attn (CUDA, imported lazily). Sequences in the step's "prefill group" may have several query tokens
(prompt chunks, possibly after a cached prefix); the rest are single-token decodes.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from serving.utils.context import AttentionContext, get_context

logger = logging.getLogger(__name__)


class AttentionBackend(Protocol):
    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 ctx: AttentionContext, scale: float) -> torch.Tensor:
        """q: [T, H, D]; caches: [num_blocks, block_size, KVH, D]. Returns [T, H, D]."""


def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, KVH, D] gathered by [B, nblk] block tables -> [B, KVH, nblk * bs, D]."""
    b, nblk = block_tables.shape
    # index_select on the flat table is several times faster than advanced indexing on CPU.
    gathered = cache.index_select(0, block_tables.reshape(-1))
    return gathered.view(b, nblk * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)


def _sdpa_prefill_plan(ctx: AttentionContext, num_seqs: int, block_size: int) -> dict:
    """Gather indices and causal mask for the prefill group, derived once per step."""
    cu = ctx.cu_seqlens_q[: num_seqs + 1].long()
    q_lens = cu[1:] - cu[:-1]
    q_max = ctx.max_seqlen_q
    offsets = torch.arange(q_max, device=cu.device)
    valid_q = offsets[None, :] < q_lens[:, None]                                   # [P, Qmax]
    q_index = torch.where(valid_q, cu[:-1, None] + offsets[None, :], 0)            # [P, Qmax]
    nblk = -(-ctx.max_seqlen_k // block_size)
    k_pos = torch.arange(nblk * block_size, device=cu.device)
    seq_lens = ctx.seq_lens_k[:num_seqs].long()
    # A query sits at absolute position (context_len - q_len + i); it sees every key up to itself, which
    # also keeps it off the padded tail of its block table. Padded query rows see key 0 (never NaN).
    q_pos = (seq_lens - q_lens)[:, None] + offsets[None, :]
    mask = k_pos[None, None, :] <= q_pos[:, :, None]                               # [P, Qmax, Lk]
    return {"valid_q": valid_q, "q_index": q_index, "mask": mask.unsqueeze(1),
            "block_tables": ctx.block_tables[:num_seqs, :nblk].long()}


def _sdpa_decode_plan(ctx: AttentionContext, first_seq: int, block_size: int) -> dict:
    nblk = -(-ctx.max_seqlen_k // block_size)
    k_pos = torch.arange(nblk * block_size, device=ctx.seq_lens_k.device)
    mask = k_pos[None, :] < ctx.seq_lens_k[first_seq:, None]                      # [B, Lk]
    return {"mask": mask[:, None, None, :], "block_tables": ctx.block_tables[first_seq:, :nblk].long()}


def sdpa_backend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 ctx: AttentionContext, scale: float) -> torch.Tensor:
    block_size = k_cache.shape[1]
    num_prefill, num_prefill_tokens = ctx.num_prefill_seqs, ctx.num_prefill_tokens
    out = torch.empty_like(q)
    if num_prefill:
        plan = ctx.derived.get("sdpa_prefill")
        if plan is None:
            plan = ctx.derived["sdpa_prefill"] = _sdpa_prefill_plan(ctx, num_prefill, block_size)
        qp = q[plan["q_index"]].transpose(1, 2)                                    # [P, H, Qmax, D]
        k = _gather_context(k_cache, plan["block_tables"])
        v = _gather_context(v_cache, plan["block_tables"])
        o = F.scaled_dot_product_attention(qp, k, v, attn_mask=plan["mask"], scale=scale, enable_gqa=True)
        out[:num_prefill_tokens] = o.transpose(1, 2)[plan["valid_q"]]
    if num_prefill_tokens < q.shape[0]:
        plan = ctx.derived.get("sdpa_decode")
        if plan is None:
            plan = ctx.derived["sdpa_decode"] = _sdpa_decode_plan(ctx, num_prefill, block_size)
        kvh = k_cache.shape[2]
        # A decode query per head; fold each KV head's query group into the query-length axis, so GQA
        # becomes plain attention over [B, KVH] with no repeated keys.
        qd = q[num_prefill_tokens:].view(-1, kvh, q.shape[1] // kvh, q.shape[2])  # [B, KVH, G, D]
        k = _gather_context(k_cache, plan["block_tables"])
        v = _gather_context(v_cache, plan["block_tables"])
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=plan["mask"], scale=scale)
        out[num_prefill_tokens:] = o.reshape(-1, q.shape[1], q.shape[2])
    return out


def flash_attn_backend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
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


def select_backend(name: str, device: torch.device, block_size: int) -> AttentionBackend:
    """auto: flash-attn on CUDA when installed and the block size suits its paged kernel, else SDPA."""
    flash_ok = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if name == "flash_attn" and not flash_ok:
        raise ValueError("attention_backend='flash_attn' needs CUDA and the flash-attn package ([gpu] extra)")
    if name == "sdpa" or not flash_ok:
        return sdpa_backend
    if block_size % 256:
        # flash-attn's paged varlen kernel takes pages of 256 tokens or multiples.
        if name == "flash_attn":
            raise ValueError(f"attention_backend='flash_attn' needs block_size % 256 == 0, got {block_size}")
        logger.info("flash-attn needs block_size %% 256 == 0 (got %d); using SDPA", block_size)
        return sdpa_backend
    return flash_attn_backend


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.backend: AttentionBackend = sdpa_backend
        # Assigned by the ModelRunner: views into its one KV allocation, [num_blocks, block_size, KVH, D].
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] -> [T, H * D]."""
        ctx = get_context()
        self.k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, ctx.slot_mapping, k)
        self.v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, ctx.slot_mapping, v)
        out = self.backend(q, self.k_cache, self.v_cache, ctx, self.scale)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
