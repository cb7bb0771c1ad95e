"""Requests and their sequences: token ids, KV-cache bookkeeping and output state.

A request with `n` completions owns `n` sequences that share the prompt. Each sequence tracks how many of
its tokens already have keys/values in the cache (`num_computed_tokens`); the scheduler gives it
`num_tokens - num_computed_tokens` more (a prompt chunk, or the one token sampled last step) until it
finishes. Preemption resets `num_computed_tokens` to 0 and keeps the tokens, so recomputing is a prefill.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from serving.engine.detokenizer import IncrementalDetokenizer
from serving.sampling_params import SamplingParams

# A golden-ratio stride keeps the n derived per-completion seeds far apart.
_SEED_STRIDE = 0x9E3779B97F4A7C15


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    __slots__ = (
        "block_hashes",
        "block_table",
        "detokenizer",
        "finish_reason",
        "grammar",
        "index",
        "logprobs",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_prompt_tokens",
        "num_registered_blocks",
        "num_sent_tokens",
        "request",
        "seed",
        "status",
        "token_ids",
    )

    def __init__(self, request: Request, index: int, detokenizer: IncrementalDetokenizer, grammar: Any = None):
        self.request = request
        self.index = index
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Chained hashes of this sequence's full blocks, extended lazily by the block manager.
        self.block_hashes: list[int] = []
        # Leading blocks already offered to the prefix cache.
        self.num_registered_blocks = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        seed = request.params.seed
        self.seed = None if seed is None else (seed + index * _SEED_STRIDE) % (1 << 63)
        self.detokenizer = detokenizer
        self.num_sent_tokens = 0
        self.logprobs: list[dict[int, float]] | None = [] if request.params.logprobs is not None else None
        # Prompt tokens served from the prefix cache at first admission (None until admitted).
        self.num_cached_tokens: int | None = None
        # The structured-output matcher (xgrammar) this sequence's tokens must satisfy, if any.
        self.grammar = grammar

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """The request's first sequence scores the prompt (once; the others share the result)."""
        return self.index == 0 and self.request.scoring_prompt

    def finish(self, reason: str | None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    # Streaming requests report every step's increment; others report once, when finished.
    stream: bool = False
    arrival_time: float = field(default_factory=time.time)
    first_token_time: float | None = None
    finished_time: float | None = None
    seqs: list[Sequence] = field(default_factory=list)
    # Per prompt token: {token id: log-probability} (the token's and the top ones); None for the first.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # Token ids banned while a sequence has fewer than min_tokens (EOS unless ignored, stop_token_ids).
    min_tokens_banned: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def scoring_prompt(self) -> bool:
        """Prompt logprobs are asked for and not complete yet."""
        scored = self.prompt_logprobs
        return scored is not None and len(scored) < len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.seqs)
