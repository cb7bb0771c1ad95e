"""Attention metadata for one forward pass, set by the ModelRunner and read by every Attention layer.

A step is one flat, variable-length batch: the new tokens of all scheduled sequences concatenated
(prefill chunks and single decode tokens alike). Each sequence's keys/values live in the paged KV
cache; the step's own new keys/values are written there first (``slot_mapping``), then each query
attends to its sequence's whole cached context through ``block_tables``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionContext:
    # [num_seqs + 1] int32: query token offsets of each sequence in the flat batch.
    cu_seqlens_q: torch.Tensor
    # [num_seqs] int32: context length of each sequence after this step (cached + new tokens).
    seq_lens_k: torch.Tensor
    # Host-side maxima, so no layer has to sync the device to size its buffers.
    max_seqlen_q: int
    max_seqlen_k: int
    # [num_tokens] int64: flat cache slot (block * block_size + offset) of each new token.
    slot_mapping: torch.Tensor
    # [num_seqs, max_blocks_per_seq] int32, padded with 0 (padding is masked by seq_lens_k).
    block_tables: torch.Tensor
    # True when every sequence contributes exactly one query token (pure decode step).
    is_decode: bool
    # Sequences [0, num_prefill_seqs) may have several query tokens; the rest have exactly one. A runner that
    # orders prefills first lets backends batch the single-token rows without padding; leaving the default
    # (None: every sequence in the prefill group) is always correct, just slower for mixed steps.
    num_prefill_seqs: int | None = None
    num_prefill_tokens: int | None = None   # host-side cu_seqlens_q[num_prefill_seqs]
    # Per-step tensors a backend derives once (masks, gather indices) and reuses in every layer.
    derived: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_prefill_seqs is None:
            self.num_prefill_seqs = 0 if self.is_decode else len(self.cu_seqlens_q) - 1
            self.num_prefill_tokens = 0 if self.is_decode else self.slot_mapping.numel()
        elif self.num_prefill_tokens is None:
            raise ValueError("num_prefill_tokens is required with num_prefill_seqs")


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
