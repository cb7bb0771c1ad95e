"""What the engine hands back per request (contract: names follow vLLM)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str                       # cumulative text so far
    token_ids: list[int]            # cumulative generated token ids
    finish_reason: str | None       # "stop" | "length" | None while running (or aborted)
    delta_text: str = ""            # new since the previous output for this request
    delta_token_ids: list[int] = field(default_factory=list)
    # Per generated token: {token id: log-probability} with the chosen token and the top `logprobs` ones, of
    # the raw model distribution (before temperature, penalties, logit_bias and grammar masks).
    logprobs: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int          # prompt tokens served from the prefix cache
    metrics: RequestMetrics
    # With SamplingParams.prompt_logprobs: per prompt token {token id: log-probability}, None for the first
    # (filled as the prefill advances; complete once the first token is sampled).
    prompt_logprobs: list[dict[int, float] | None] | None = None


@dataclass(frozen=True)
class Delta:
    """One increment of one completion, as an LLM replica streams it to the ingress (over Ray)."""

    index: int                                      # within the request's n completions
    text: str                                       # new text
    num_tokens: int                                 # tokens generated so far
    finish_reason: str | None
    # With logprobs: the new tokens and their {token id: log-probability} entries (see CompletionOutput).
    token_ids: list[int] | None = None
    logprobs: list[dict[int, float]] | None = None
    # With prompt_logprobs: the prompt's entries (None for the first token), once, in completion 0's first.
    prompt_logprobs: list[dict[int, float] | None] | None = None
