"""Per-request sampling settings (contract: names follow vLLM)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(isinstance(self.n, int) and 1 <= self.n <= 16, "n", self.n, "an integer in [1, 16]")
        _check(_finite(self.temperature) and 0.0 <= self.temperature <= 10.0, "temperature", self.temperature,
               "a number in [0, 10]")
        _check(_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", self.top_p, "a number in (0, 1]")
        _check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1), "top_k", self.top_k,
               "-1 (disabled) or an integer >= 1")
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", self.max_tokens,
               "an integer >= 1")
        _check(all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 16, "stop", self.stop,
               "up to 16 non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "non-negative token ids")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "seed", self.seed,
               "an integer in [0, 2**63)")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               "logprobs", self.logprobs, "an integer in [0, 20]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"invalid {field}={value!r}: expected {expected}")
