"""Batch-size buckets for decode steps, shared by the compiled CPU path and CUDA graphs.

A compiled or captured forward is specialised to its input shapes; padding each decode step's batch up to
one of a few sizes bounds how many variants exist (and so recompiles and captures). Steps larger than the
biggest bucket, and steps with prefill tokens, run eagerly.

The step's inputs are copied into static buffers sized for the largest bucket (CUDA graphs replay on fixed
addresses; the compiled path reads the same views). Padding rows are harmless by construction: each feeds
token 0 at position 0 into a scratch KV block that no sequence owns (its cache slot is that block's first,
its context is that one slot), so no padded row writes or reads a real sequence's keys and values.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


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
