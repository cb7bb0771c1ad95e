"""Batch-size buckets for decode steps, shared by the compiled CPU path and CUDA graphs.

A compiled or captured forward is specialised to its input shapes; padding each decode step's batch up to
one of a few sizes bounds how many variants exist (and so recompiles and captures). Steps larger than the
biggest bucket, and steps with prefill tokens, run eagerly.

The step's inputs are copied into static buffers sized for the largest bucket (CUDA graphs replay on fixed
addresses; the compiled path reads the same views). Padding rows are harmless by construction: each feeds
token 0 at position 0 into a scratch KV block that no sequence owns (its cache slot is that block's first,
its context is that one slot), so no padded row writes or reads a real sequence's keys and values.

`BucketedDecode` is the one seam both paths share: it picks a step's bucket, fills the buffers and readies
every bucket at start; a subclass says how a padded step runs (serving/engine/compiled.py: a compiled
forward; serving/engine/cuda_graphs.py: the replay of a graph captured at start).
"""
from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from serving.layers.attention_types import KVLayout
from serving.utils.context import AttentionContext

logger = logging.getLogger(__name__)

# The model's hidden states for a step: (input_ids, positions, attention context) -> [T, hidden].
StepForward = Callable[[torch.Tensor, torch.Tensor, AttentionContext], torch.Tensor]


def batch_buckets(max_num_seqs: int, largest: int = 512) -> tuple[int, ...]:
    """1, 2, 4, 8, ... up to min(max_num_seqs, largest), which is itself the last bucket."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    top = min(max_num_seqs, largest)
    sizes = [1 << i for i in range(top.bit_length()) if 1 << i < top]
    return (*sizes, top)


def bucket_for(num_seqs: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds `num_seqs` sequences; None: the step runs eagerly."""
    i = bisect.bisect_left(buckets, num_seqs)
    return buckets[i] if i < len(buckets) else None


@dataclass
class PaddedDecode:
    """Views of the static buffers for one bucket; the first `num_seqs` rows are the real step's."""

    bucket: int
    num_seqs: int
    input_ids: torch.Tensor          # [bucket] int64
    positions: torch.Tensor          # [bucket] int64
    slot_mapping: torch.Tensor       # [bucket] int64
    cu_seqlens_q: torch.Tensor       # [bucket + 1] int32: 0, 1, ..., bucket
    seq_lens_k: torch.Tensor         # [bucket] int32
    block_tables: torch.Tensor       # [bucket, max_blocks] int32

    def unpad(self, out: torch.Tensor) -> torch.Tensor:
        """The real rows of a per-token output ([bucket, ...] -> [num_seqs, ...])."""
        return out[:self.num_seqs]


class DecodeBuffers:
    """Static decode inputs for batches up to `max_batch` and contexts up to `max_blocks` blocks."""

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, scratch_block: int,
                 device: torch.device | str = "cpu"):
        self.block_size, self.scratch_block, self.max_blocks = block_size, scratch_block, max_blocks
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.cu_seqlens_q = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.seq_lens_k = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)

    def fill(self, bucket: int, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
             seq_lens_k: torch.Tensor, block_tables: torch.Tensor) -> PaddedDecode:
        """Copy a decode step (one token per sequence) into the buffers, padded to `bucket` rows."""
        n, width = block_tables.shape
        if not n <= bucket <= self.input_ids.shape[0]:
            raise ValueError(f"a step of {n} sequences does not fit bucket {bucket} "
                             f"(buffers hold {self.input_ids.shape[0]})")
        if width > self.max_blocks:
            raise ValueError(f"block tables of {width} blocks exceed the buffers' {self.max_blocks}")
        for buffer, values in ((self.input_ids, input_ids), (self.positions, positions),
                               (self.slot_mapping, slot_mapping), (self.seq_lens_k, seq_lens_k)):
            buffer[:n].copy_(values, non_blocking=True)
        self.input_ids[n:bucket] = 0
        self.positions[n:bucket] = 0
        self.slot_mapping[n:bucket] = self.scratch_block * self.block_size
        self.seq_lens_k[n:bucket] = 1
        tables = self.block_tables[:bucket]
        tables[:n, :width].copy_(block_tables, non_blocking=True)
        tables[:n, width:] = 0
        tables[n:] = 0
        tables[n:, 0] = self.scratch_block
        return PaddedDecode(bucket, n, self.input_ids[:bucket], self.positions[:bucket],
                            self.slot_mapping[:bucket], self.cu_seqlens_q[:bucket + 1],
                            self.seq_lens_k[:bucket], tables)


def padded_context(step: PaddedDecode, host_seq_lens_k: list[int]) -> AttentionContext:
    """The attention context of a padded step: views of the static buffers, and `host_seq_lens_k` for the
    backend's plan (the real rows' lengths then 1 per padding row; a graph capture passes upper bounds)."""
    return AttentionContext(
        cu_seqlens_q=step.cu_seqlens_q, seq_lens_k=step.seq_lens_k, slot_mapping=step.slot_mapping,
        block_tables=step.block_tables, host_cu_seqlens_q=list(range(step.bucket + 1)),
        host_seq_lens_k=host_seq_lens_k, num_prefill_seqs=0, num_prefill_tokens=0)


class BucketedDecode:
    """Pure decode steps of up to the largest bucket's sequences, padded into static buffers, run by `_run`;
    `prepare` readies every bucket at start (on steps of padding rows only: they touch just the scratch block),
    so nothing is compiled or captured on the request path."""

    path = ""                       # EngineStats.decode_path
    prepared = "prepared"           # what the start-up log line says `_prepare` did
    largest_first = False           # the order `prepare` takes the buckets in

    def __init__(self, forward: StepForward, layout: KVLayout, max_num_seqs: int, scratch_block: int):
        self.forward = forward
        self.layout = layout
        self.buckets = batch_buckets(max_num_seqs)
        self.buffers = DecodeBuffers(self.buckets[-1], layout.max_blocks_per_seq, layout.block_size,
                                     scratch_block, layout.device)
        self.prepare_seconds: dict[int, float] = {}
        self.steps = 0              # steps that ran bucketed

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor | None:
        """The step's hidden states [num_seqs, hidden]; None: it has prefill tokens or more sequences than the
        largest bucket, and runs eagerly."""
        num_seqs = len(ctx.host_seq_lens_k)
        bucket = bucket_for(num_seqs, self.buckets) if ctx.num_prefill_seqs == 0 else None
        if bucket is None:
            return None
        step = self.buffers.fill(bucket, input_ids, positions, ctx.slot_mapping, ctx.seq_lens_k, ctx.block_tables)
        self.steps += 1
        return step.unpad(self._run(step, ctx.host_seq_lens_k + [1] * (bucket - num_seqs)))

    def prepare(self) -> None:
        order = sorted(self.buckets, reverse=self.largest_first)
        device = self.buffers.input_ids.device
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        for i, bucket in enumerate(order):
            step = self.buffers.fill(bucket, empty, empty, empty, empty.int(),
                                     torch.zeros(0, 1, dtype=torch.int32, device=device))
            start = time.perf_counter()
            self._prepare(step)
            self.prepare_seconds[bucket] = time.perf_counter() - start
            logger.info("%s decode bucket %d (%d/%d) in %.1f s", self.prepared, bucket, i + 1, len(order),
                        self.prepare_seconds[bucket])

    def _prepare(self, step: PaddedDecode) -> None:
        """Ready the bucket of `step` (a step of padding rows only)."""
        raise NotImplementedError

    def _run(self, step: PaddedDecode, host_seq_lens_k: list[int]) -> torch.Tensor:
        """The hidden states of a padded step, [bucket, hidden]."""
        raise NotImplementedError
