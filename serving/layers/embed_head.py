"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary rows."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from serving.layers.linear import linear, narrow
from serving.layers.packed_weights import can_pack, pack
from serving.parallel.state import get_tp_rank, get_tp_world_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_world_size()
        self.vocab_size = vocab_size
        # Ceil division: the last rank's slice is padded with zero rows when the vocab does not divide.
        self.rows_per_rank = -(-vocab_size // self.tp_size)
        self.vocab_start = self.rows_per_rank * self.tp_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.rows_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(narrow(loaded, 0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        y = F.embedding((input_ids - self.vocab_start) * in_shard, self.weight) * in_shard.unsqueeze(-1)
        dist.all_reduce(y)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(vocab_size, hidden_size)
        self.packed_weight: torch.Tensor | None = None   # set by pack_weight

    def pack_weight(self) -> None:
        """Also hold this rank's float32 CPU rows packed for oneDNN (a copy: a tied embedding keeps its own)."""
        if can_pack(self.weight):
            self.packed_weight = pack(self.weight.data)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight, packed=self.packed_weight)
        if self.tp_size > 1:
            shards = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(shards, logits)
            logits = torch.cat(shards, dim=-1)
        return logits[:, : self.vocab_size].float()
