"""Attention through torch SDPA over gathered context blocks, and the CPU variant whose decodes and short
prefill chunks run in the native paged kernel (serving/kernels).

Prefill sequences attend one by one (no padding to the longest prompt; a chunk that starts at the beginning
of its context uses SDPA's causal mode). Decode rows attend in tiles of rows of similar context length,
each tile gathered into the backend's workspace and padded only to its own longest context:
- on CPU a tile holds about 2 MiB of keys and values (still in the CPU cache when SDPA reads them), at
  least 4 rows (CPU_POLICY);
- on CUDA a tile holds at most 256 MiB, and only rows whose context is at least half the tile's longest, so
  no row is padded to more than twice its length (CUDA_POLICY; a paged kernel, flash-attn, is the fast path
  there; this one is bounded in memory).
The workspace is allocated once, at its planned bound, which `workspace_bytes` reports to the KV budget.
With an int8 KV cache the gathered blocks are dequantized into the workspace.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serving.kernels import PagedDecodeAttention
from serving.layers import kv_quant
from serving.layers.attention_types import KVCache, KVLayout
from serving.layers.kv_quant import QuantizedKV
from serving.utils.context import AttentionContext


@dataclass(frozen=True)
class SdpaPolicy:
    tile_bytes: int                 # gathered keys and values a decode tile aims at
    tile_min_rows: int
    bounded_padding: bool           # a tile takes only rows of at least half its longest context
    # SDPA's fused CUDA kernels take no grouped-query attention with a mask: the math fallback would build a
    # float32 score matrix. Expanding the prefill sequence's KV heads (repeat_interleave) avoids it.
    expand_gqa: bool


CPU_POLICY = SdpaPolicy(tile_bytes=2 << 20, tile_min_rows=4, bounded_padding=False, expand_gqa=False)
CUDA_POLICY = SdpaPolicy(tile_bytes=256 << 20, tile_min_rows=1, bounded_padding=True, expand_gqa=True)


def decode_tiles(sorted_lens: list[int], block_size: int, tile_tokens: int, policy: SdpaPolicy) -> list[tuple[int, int]]:
    """(first row, rows) of each tile over context lengths sorted longest first."""
    tiles, start = [], 0
    while start < len(sorted_lens):
        longest = sorted_lens[start]
        count = max(policy.tile_min_rows, tile_tokens // (-(-longest // block_size) * block_size))
        end = min(start + count, len(sorted_lens))
        if policy.bounded_padding:
            # Stop at the first row under half the tile's longest context, so no row is padded to more than
            # twice its length (plus a block).
            end = next((j for j in range(start, end) if 2 * sorted_lens[j] < longest), end)
        tiles.append((start, end - start))
        start = end
    return tiles


@dataclass
class PrefillPlan:
    rows: slice                     # the sequence's query tokens in the flat batch
    k_len: int
    block_tables: torch.Tensor      # [1, nblk] int64
    mask: torch.Tensor | None       # [q_len, k_len] bool; None: plain causal


@dataclass
class DecodeTile:
    rows: torch.Tensor              # [R] int64 rows of the decode group
    block_tables: torch.Tensor      # [R, nblk] int64
    mask: torch.Tensor              # [R, 1, 1, nblk * block_size] bool


@dataclass
class SdpaPlan:
    prefill: list[PrefillPlan]
    decode: list[DecodeTile]


class _Workspace:
    """The gathered keys and values of one tile (layers run one after another and share it)."""

    def __init__(self, layout: KVLayout, tokens: int):
        self.layout = layout
        self.blocks = -(-tokens // layout.block_size)
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return self.blocks * self.layout.block_size * self.layout.gathered_bytes_per_token

    def gather(self, cache: KVCache, block_tables: torch.Tensor, role: str) -> torch.Tensor:
        """[num_blocks, bs, KVH, D] gathered by [B, nblk] block tables -> [B, KVH, nblk * bs, D]."""
        b, nblk = block_tables.shape
        flat = block_tables.reshape(-1)
        buffer = self._buffers.get(role)
        if buffer is None or buffer.shape[0] < flat.numel():
            # Once, at the planned bound (a caller beyond it, e.g. a test's own plan, grows it).
            buffer = self._buffers[role] = torch.empty((max(self.blocks, flat.numel()), *cache.shape[1:]),
                                                       dtype=cache.dtype, device=cache.device)
        gathered = kv_quant.gather(cache, flat, out=buffer[:flat.numel()])
        return gathered.view(b, nblk * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)


class SdpaBackend:
    name = "sdpa"
    # Decode tiles group rows by host-side lengths (a replay would reuse the capture's grouping and padding).
    graph_safe = False

    def __init__(self, layout: KVLayout, policy: SdpaPolicy | None = None):
        self.layout = layout
        self.policy = policy or (CPU_POLICY if layout.device.type == "cpu" else CUDA_POLICY)
        self._tile_tokens = self.policy.tile_bytes // layout.gathered_bytes_per_token
        self._expand_gqa = self.policy.expand_gqa and layout.num_heads != layout.num_kv_heads
        self._workspace = _Workspace(layout, self._gathered_tokens_bound())

    def _gathered_tokens_bound(self) -> int:
        """The most tokens one tile or one prefill sequence gathers."""
        longest = self.layout.max_blocks_per_seq * self.layout.block_size
        return max(self._tile_tokens, self.policy.tile_min_rows * longest)

    @property
    def workspace_bytes(self) -> int:
        expanded = 0
        if self._expand_gqa:
            # The prefill's repeated keys and values: [1, H, Lk, D] each.
            expanded = 2 * self.layout.num_heads * self.layout.head_dim * self.layout.dtype.itemsize \
                * self.layout.max_blocks_per_seq * self.layout.block_size
        return self._workspace.nbytes + expanded

    def plan(self, ctx: AttentionContext) -> SdpaPlan:
        return SdpaPlan(self._prefill_plan(ctx, range(ctx.num_prefill_seqs)), self._decode_plan(ctx))

    def _prefill_plan(self, ctx: AttentionContext, seqs: Iterable[int]) -> list[PrefillPlan]:
        """The plans of prefill sequences `seqs`."""
        cu, seq_lens, bs = ctx.host_cu_seqlens_q, ctx.host_seq_lens_k, self.layout.block_size
        device = ctx.seq_lens_k.device
        plans = []
        for i in seqs:
            q_len, k_len = cu[i + 1] - cu[i], seq_lens[i]
            mask = None
            if q_len != k_len:
                # Queries are the last q_len positions: query j sees keys up to k_len - q_len + j.
                k_pos = torch.arange(k_len, device=device)
                q_pos = torch.arange(k_len - q_len, k_len, device=device)
                mask = k_pos[None, :] <= q_pos[:, None]
            block_tables = ctx.block_tables[i:i + 1, :-(-k_len // bs)].long()
            plans.append(PrefillPlan(slice(cu[i], cu[i + 1]), k_len, block_tables, mask))
        return plans

    def _decode_plan(self, ctx: AttentionContext) -> list[DecodeTile]:
        first, bs = ctx.num_prefill_seqs, self.layout.block_size
        host_lens = ctx.host_seq_lens_k[first:]
        if not host_lens:
            return []
        device = ctx.seq_lens_k.device
        order = sorted(range(len(host_lens)), key=host_lens.__getitem__, reverse=True)
        order_t = torch.tensor(order, dtype=torch.int64).to(device, non_blocking=True)
        seq_lens, tables = ctx.seq_lens_k[first:], ctx.block_tables[first:]
        k_pos = torch.arange(-(-host_lens[order[0]] // bs) * bs, device=device)
        tiles = []
        for start, count in decode_tiles([host_lens[i] for i in order], bs, self._tile_tokens, self.policy):
            nblk = -(-host_lens[order[start]] // bs)
            rows = order_t[start:start + count]
            mask = k_pos[None, :nblk * bs] < seq_lens[rows, None]                              # [rows, Lk]
            tiles.append(DecodeTile(rows, tables[rows, :nblk].long(), mask[:, None, None, :]))
        return tiles

    def forward(self, q: torch.Tensor, k_cache: KVCache, v_cache: KVCache, ctx: AttentionContext,
                scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        self._prefill(q, k_cache, v_cache, ctx.plan.prefill, scale, out)
        if ctx.num_prefill_tokens < q.shape[0]:
            self._decode(q, k_cache, v_cache, ctx, scale, out)
        return out

    def _prefill(self, q: torch.Tensor, k_cache: KVCache, v_cache: KVCache, plans: list[PrefillPlan],
                 scale: float, out: torch.Tensor) -> None:
        group = q.shape[1] // k_cache.shape[2]
        for p in plans:
            k = self._workspace.gather(k_cache, p.block_tables, "k")[:, :, :p.k_len]         # [1, KVH, Lk, D]
            v = self._workspace.gather(v_cache, p.block_tables, "v")[:, :, :p.k_len]
            if self._expand_gqa:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            o = F.scaled_dot_product_attention(q[p.rows].transpose(0, 1).unsqueeze(0), k, v, attn_mask=p.mask,
                                               is_causal=p.mask is None, scale=scale,
                                               enable_gqa=group > 1 and not self._expand_gqa)
            out[p.rows] = o.squeeze(0).transpose(0, 1)

    def _decode(self, q: torch.Tensor, k_cache: KVCache, v_cache: KVCache, ctx: AttentionContext,
                scale: float, out: torch.Tensor) -> None:
        """The decode rows of `out` (one query token each), tile by tile over gathered contexts."""
        kvh = k_cache.shape[2]
        # A decode query per head; fold each KV head's query group into the query-length axis, so GQA
        # becomes plain attention over [B, KVH] with no repeated keys.
        qd = q[ctx.num_prefill_tokens:].view(-1, kvh, q.shape[1] // kvh, q.shape[2])      # [B, KVH, G, D]
        od = out[ctx.num_prefill_tokens:].view(qd.shape)
        for tile in ctx.plan.decode:
            k = self._workspace.gather(k_cache, tile.block_tables, "k")
            v = self._workspace.gather(v_cache, tile.block_tables, "v")
            o = F.scaled_dot_product_attention(qd.index_select(0, tile.rows), k, v, attn_mask=tile.mask,
                                               scale=scale)
            od.index_copy_(0, tile.rows, o)


# Prefill chunks whose context's keys and values (one layer's) fit in this many bytes attend in the native
# kernel too (float32 caches), each token as a decode query at its position: every row re-reads the whole
# context, which is cheap while it stays in the core's L2 cache. Against gathering the context for SDPA,
# one sequence: 1.1-2.5x faster at 32-512 tokens with 6 query / 2 KV heads of 64 (512 tokens: 512 KiB),
# 1.5-3.2x at 32-64 tokens with 64 / 8 heads of 128; slower beyond, where SDPA's blocked matrix products
# pay off: 1.1-1.7x at 1024-2048 tokens, 1.3-1.5x for 64-256 new tokens after a 1-2 MiB context. An int8
# cache takes the same bound in tokens (it counts the dequantized bytes SDPA would gather): one fresh chunk
# of 32-512 tokens with 6 / 2 heads of 64 took the kernel 1.7-4.8x less time than SDPA's dequantizing gather.
KERNEL_PREFILL_MAX_CONTEXT_BYTES = 512 << 10


@dataclass
class KernelPlan:
    prefill: list[PrefillPlan]      # the prefill sequences SDPA attends
    first_row: int                  # the kernel attends rows [first_row, T) of the flat batch
    block_tables: torch.Tensor      # [T - first_row, max_blocks] int32: each row's sequence's table
    seq_lens: torch.Tensor          # [T - first_row] int32: the keys each row sees


class CpuKernelBackend(SdpaBackend):
    """Decode rows, and the rows of prefill chunks whose context fits KERNEL_PREFILL_MAX_CONTEXT_BYTES, through
    the native paged-attention kernel, which reads each cached key and value in place: float32 entries, or int8
    codes with their scales (float32 queries either way). It gathers nothing for them. Prefill chunks over
    longer contexts go through SDPA (long queries: matrix products pay off)."""

    name = "cpu_kernel"
    # A pure decode step's plan is views of the context's device tensors.
    graph_safe = True

    def __init__(self, layout: KVLayout, kernel: PagedDecodeAttention):
        self._kernel = kernel
        # The longest context a prefill chunk may have to take the kernel.
        self._prefill_max_context = KERNEL_PREFILL_MAX_CONTEXT_BYTES // layout.gathered_bytes_per_token
        super().__init__(layout, CPU_POLICY)

    def _gathered_tokens_bound(self) -> int:
        return self.layout.max_blocks_per_seq * self.layout.block_size

    def plan(self, ctx: AttentionContext) -> KernelPlan:
        seqs, cu = ctx.num_prefill_seqs, ctx.host_cu_seqlens_q
        long = [i for i in range(seqs) if ctx.host_seq_lens_k[i] > self._prefill_max_context]
        if len(long) == seqs:
            # The decode rows only (a pure decode step's plan: views, nothing computed).
            return KernelPlan(self._prefill_plan(ctx, long), ctx.num_prefill_tokens,
                              ctx.block_tables[seqs:].contiguous(), ctx.seq_lens_k[seqs:].contiguous())
        # Every row: row t of a sequence whose step holds tokens [cu_i, cu_i+1) of its seq_lens_k[i] sees
        # seq_lens_k[i] - (cu_i+1 - 1 - t) keys (a decode row: seq_lens_k[i]).
        tokens, device = cu[-1], ctx.seq_lens_k.device
        q_lens = ctx.cu_seqlens_q.diff()
        seq_of_row = torch.repeat_interleave(torch.arange(len(q_lens), device=device), q_lens,
                                             output_size=tokens)
        first_key = (ctx.seq_lens_k - ctx.cu_seqlens_q[1:] + 1).index_select(0, seq_of_row)
        seq_lens = (first_key + torch.arange(tokens, device=device, dtype=first_key.dtype)).to(torch.int32)
        for i in long:
            seq_lens[cu[i]:cu[i + 1]] = 1     # a cheap placeholder: SDPA writes these rows afterwards
        return KernelPlan(self._prefill_plan(ctx, long), 0, ctx.block_tables.index_select(0, seq_of_row),
                          seq_lens)

    def forward(self, q: torch.Tensor, k_cache: KVCache, v_cache: KVCache, ctx: AttentionContext,
                scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        plan: KernelPlan = ctx.plan
        if plan.first_row < q.shape[0]:
            self._kernel_rows(q, k_cache, v_cache, plan, scale, out)
        self._prefill(q, k_cache, v_cache, plan.prefill, scale, out)
        return out

    def _kernel_rows(self, q: torch.Tensor, k_cache: KVCache, v_cache: KVCache, plan: KernelPlan,
                     scale: float, out: torch.Tensor) -> None:
        quantized = isinstance(k_cache, QuantizedKV)
        caches = (k_cache.codes, v_cache.codes, k_cache.params, v_cache.params) if quantized \
            else (k_cache, v_cache)
        if q.dtype != torch.float32 or not (q.is_contiguous() and all(c.is_contiguous() for c in caches)):
            raise ValueError("the CPU attention kernel takes contiguous float32 queries and caches")
        first = plan.first_row
        self._kernel(out[first:], q[first:], *caches[:2], plan.block_tables, plan.seq_lens, scale, *caches[2:])
