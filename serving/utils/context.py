"""Attention metadata for one forward pass, set by the ModelRunner and read by every Attention layer.

A step is one flat, variable-length batch: the new tokens of all scheduled sequences concatenated
(prefill chunks and single decode tokens alike). Each sequence's keys/values live in the paged KV
cache; the step's own new keys/values are written there first (``slot_mapping``), then each query
attends to its sequence's whole cached context through ``block_tables``. Sequences [0, num_prefill_seqs)
may have several query tokens; the rest have exactly one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionContext:
    # [num_seqs + 1] int32: query token offsets of each sequence in the flat batch.
    cu_seqlens_q: torch.Tensor
    # [num_seqs] int32: context length of each sequence after this step (cached + new tokens).
    seq_lens_k: torch.Tensor
    # [num_tokens] int64: flat cache slot (block * block_size + offset) of each new token.
    slot_mapping: torch.Tensor
    # [num_seqs, max_blocks_per_seq] int32, padded with 0 (padding is masked by seq_lens_k).
    block_tables: torch.Tensor
    # Host-side copies of cu_seqlens_q and seq_lens_k, so that planning never syncs the device.
    host_cu_seqlens_q: list[int]
    host_seq_lens_k: list[int]
    num_prefill_seqs: int
    num_prefill_tokens: int             # host-side cu_seqlens_q[num_prefill_seqs]
    # The backend's per-step plan, made by the runner once before the forward (AttentionBackend.plan).
    plan: Any = None

    @property
    def max_seqlen_q(self) -> int:
        cu = self.host_cu_seqlens_q
        return max(b - a for a, b in zip(cu, cu[1:]))

    @property
    def max_seqlen_k(self) -> int:
        return max(self.host_seq_lens_k)


_CONTEXT: AttentionContext | None = None


def set_context(context: AttentionContext) -> None:
    global _CONTEXT
    _CONTEXT = context


def get_context() -> AttentionContext:
    if _CONTEXT is None:
        raise RuntimeError("attention context is not set: call the model through the ModelRunner")
    return _CONTEXT


def reset_context() -> None:
    global _CONTEXT
    _CONTEXT = None
