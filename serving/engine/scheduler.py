"""Continuous batching with chunked prefill and preemption by recompute.

Every step has a token budget (`max_num_batched_tokens`). Running sequences are served first, oldest
first: a decoding sequence takes one token, one still prefilling takes the rest of its prompt up to the
budget. When the KV pool cannot hold a running sequence's next tokens, the newest running sequence is
preempted (its blocks freed, its tokens kept) and goes back to the front of the queue to be recomputed
later. Then waiting sequences are admitted in arrival order while the budget, `max_num_seqs` and free
blocks allow (none in a step that had to preempt). The oldest running sequence can always proceed, since
the engine rejects requests that cannot fit in the pool alone.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from serving.engine.block_manager import BlockManager
from serving.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    # Sequences with several new tokens first (the prefill group), then those with exactly one.
    seqs: list[Sequence]
    num_new_tokens: list[int]
    num_prefill_seqs: int


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, block_manager: BlockManager):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput | None:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preemptions_before = self.num_preemptions
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._make_room(seq, num_new):
                break
            scheduled.append((seq, num_new))
            budget -= num_new
            i += 1
        # Admitting right after preempting would only thrash.
        admit = self.num_preemptions == preemptions_before
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_new = self.block_manager.admit(seq, budget)
            if num_new == 0:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed_tokens
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
        if not scheduled:
            return None
        prefill = [item for item in scheduled if item[1] > 1]
        ordered = prefill + [item for item in scheduled if item[1] == 1]
        return SchedulerOutput(
            seqs=[seq for seq, _ in ordered],
            num_new_tokens=[n for _, n in ordered],
            num_prefill_seqs=len(prefill),
        )

    def _make_room(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Preempt the newest running sequences until `seq` fits; False when `seq` itself had to go."""
        while not self.block_manager.grow(seq, num_new_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        # Front of the queue: preempted sequences are older than anything still waiting.
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def remove_finished(self) -> None:
        """Drop finished sequences from the running set and free their blocks."""
        still_running = []
        for seq in self.running:
            if seq.finished:
                self.block_manager.free(seq)
            else:
                still_running.append(seq)
        self.running = still_running

    def abort(self, seq: Sequence) -> None:
        """Drop an unfinished sequence, freeing its blocks."""
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        seq.finish(None)
