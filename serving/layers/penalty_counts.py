"""Per-sequence token counts for the penalties, kept on the device across steps.

One row per slot (a sequence's slot is chosen on the host, see serving/engine/penalty_slots.py): the counts
of the tokens it generated (frequency and presence penalties) and the set of its prompt tokens (repetition
penalty, with the generated ones). A step uploads only what is new, a sequence's prompt and history when
it takes a slot and then the token it sampled last step, and `update` folds that in before sampling.

Updates can be re-sent (a step that failed is re-run by fault isolation): every generated token goes with
its position, and positions the slot already counted are skipped, so nothing is counted twice; a reset
zeroes the slot first.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from serving.layers.sampler import SamplingTensors


class PenaltyCounts:
    def __init__(self, num_slots: int, vocab_size: int, device: torch.device):
        self.output = torch.zeros(num_slots, vocab_size, dtype=torch.float32, device=device)
        self.prompt = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)
        self.num_counted = torch.zeros(num_slots, dtype=torch.int64, device=device)   # generated tokens

    def update(self, t: SamplingTensors) -> None:
        """Fold a step's uploads in: resets first, then prompt tokens, then generated tokens not yet counted."""
        if t.reset_slots is not None:
            self.output.index_fill_(0, t.reset_slots, 0.0)
            self.prompt.index_fill_(0, t.reset_slots, False)
            self.num_counted.index_fill_(0, t.reset_slots, 0)
        if t.prompt_slots is not None:
            self.prompt[t.prompt_slots, t.prompt_ids] = True
        if t.count_slots is not None:
            fresh = t.count_positions >= self.num_counted[t.count_slots]
            self.output.index_put_((t.count_slots, t.count_ids), fresh.to(self.output.dtype), accumulate=True)
            self.num_counted.scatter_reduce_(0, t.count_slots, t.count_positions + 1, reduce="amax")

    def generated(self, slots: torch.Tensor) -> torch.Tensor:
        """[P, V] float32: how often each token was generated, per slot."""
        return self.output.index_select(0, slots)

    def seen(self, slots: torch.Tensor) -> torch.Tensor:
        """[P, V] bool: tokens in the prompt or generated, per slot."""
        return self.prompt.index_select(0, slots) | (self.output.index_select(0, slots) > 0)
