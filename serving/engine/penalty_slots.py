"""Which row of the sampler's device-side token counts (serving/layers/penalty_counts.py) each penalized
sequence owns, and which of its tokens the device has yet to count.

Rebuilding the penalties' counts from the token lists would upload every generated token of every sequence
at every step; with a slot per sequence a step uploads only what is new: the prompt and history when the
sequence takes a slot, then the one token it sampled last step.

A slot is held until another sequence needs one: the least recently scheduled holder gives it up (a
finished sequence never comes back; one that does takes a fresh slot and uploads its history again). There
are max_num_seqs slots, as many as sequences run at once, so every sequence of a step gets one. Holding a
finished sequence until then keeps at most that many alive.

What a step uploads counts as on the device only once `commit` says the step sampled: a step that failed
(fault isolation re-runs it in parts) uploads it again, and the device skips what it already counted.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from serving.engine.sequence import Sequence


@dataclass
class _Slot:
    index: int
    # Generated tokens the device has counted; -1: the slot must be reset and the prompt marked first.
    num_counted: int = -1


class PenaltySlots:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._held: OrderedDict[Sequence, _Slot] = OrderedDict()   # least recently scheduled first
        self._free = list(range(num_slots - 1, -1, -1))   # popped from the end: slot 0 first
        self._pending: list[tuple[_Slot, int]] = []

    def tensors(self, seqs: list[Sequence]) -> dict[str, torch.Tensor | int]:
        """SamplingTensors fields for the penalized sequences of a step (in row order): their slots and what
        the device is missing of their tokens. Called for every step, with no sequences too: what an earlier
        step that did not sample left pending must not be committed by this one."""
        self._pending = []
        if not seqs:
            return {}
        for seq in seqs:
            if seq in self._held:
                self._held.move_to_end(seq)
        slots = [self._slot(seq) for seq in seqs]
        reset: list[int] = []
        prompt_slots: list[int] = []
        prompt_ids: list[int] = []
        count_slots: list[int] = []
        count_positions: list[int] = []
        count_ids: list[int] = []
        for seq, slot in zip(seqs, slots):
            start = slot.num_counted
            if start < 0:
                reset.append(slot.index)
                prompt_slots.extend([slot.index] * seq.num_prompt_tokens)
                prompt_ids.extend(seq.token_ids[:seq.num_prompt_tokens])
                start = 0
            new = seq.token_ids[seq.num_prompt_tokens + start:]
            count_slots.extend([slot.index] * len(new))
            count_positions.extend(range(start, start + len(new)))
            count_ids.extend(new)
        self._pending = [(slot, seq.num_output_tokens) for seq, slot in zip(seqs, slots)]
        out: dict[str, torch.Tensor | int] = {
            "num_penalty_slots": self.num_slots,
            "penalty_slots": torch.tensor([slot.index for slot in slots], dtype=torch.int64),
        }
        if reset:
            out["reset_slots"] = torch.tensor(reset, dtype=torch.int64)
            out["prompt_slots"] = torch.tensor(prompt_slots, dtype=torch.int64)
            out["prompt_ids"] = torch.tensor(prompt_ids, dtype=torch.int64)
        if count_ids:
            out["count_slots"] = torch.tensor(count_slots, dtype=torch.int64)
            out["count_positions"] = torch.tensor(count_positions, dtype=torch.int64)
            out["count_ids"] = torch.tensor(count_ids, dtype=torch.int64)
        return out

    def commit(self) -> None:
        """The step whose tensors were built last has sampled: its uploads are on the device."""
        for slot, num_counted in self._pending:
            slot.num_counted = num_counted
        self._pending = []

    def _slot(self, seq: Sequence) -> _Slot:
        slot = self._held.get(seq)
        if slot is None:
            if not self._free:
                # The front holder is not in this step: the step's holders were moved to the back.
                _, evicted = self._held.popitem(last=False)
                self._free.append(evicted.index)
            slot = self._held[seq] = _Slot(self._free.pop())
        return slot
