"""Per-request sampling settings (contract: names follow vLLM)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS_TOKENS = 300
MAX_GUIDED_CHOICES = 256


@dataclass
class GuidedDecodingParams:
    """Constrain the output to a grammar (vLLM's names); exactly one of the fields is set.

    json: a JSON schema (dict or JSON text); regex: a regular expression the whole output matches;
    choice: one of these strings; json_object: any JSON object.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        _check(len(given) == 1, "guided_decoding", given, "exactly one of json, regex, choice, json_object")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError:
                raise ValueError("invalid guided_decoding.json: not valid JSON text") from None
        _check(self.json is None or isinstance(self.json, dict), "guided_decoding.json", type(self.json).__name__,
               "a JSON schema object")
        _check(self.regex is None or (isinstance(self.regex, str) and bool(self.regex)), "guided_decoding.regex",
               self.regex, "a non-empty string")
        _check(self.choice is None or (isinstance(self.choice, list) and 0 < len(self.choice) <= MAX_GUIDED_CHOICES
                                       and all(isinstance(c, str) and c for c in self.choice)),
               "guided_decoding.choice", "...", f"1 to {MAX_GUIDED_CHOICES} non-empty strings")

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): what a compiled grammar is cached under."""
        if self.json is not None:
            return "json", json.dumps(self.json, sort_keys=True, separators=(",", ":"))
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        return "json_object", ""


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
    # Log-probabilities of the raw model distribution (before temperature, penalties, bias, top-k/top-p and
    # grammar masks; vLLM's default "raw_logprobs"): the chosen token's plus the `logprobs` most likely.
    logprobs: int | None = None
    # The same for every prompt token after the first (the first has no context to be predicted from).
    prompt_logprobs: int | None = None
    # OpenAI semantics, over the generated tokens: logit -= frequency * count + presence * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # transformers / vLLM semantics, over prompt and generated tokens: a positive logit is divided by it,
    # a negative one multiplied.
    repetition_penalty: float = 1.0
    # token id -> added to its logit (OpenAI: -100 bans, 100 forces).
    logit_bias: dict[int, float] | None = None
    # EOS and stop_token_ids are banned until this many tokens are generated.
    min_tokens: int = 0
    guided_decoding: GuidedDecodingParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.guided_decoding, dict):
            self.guided_decoding = GuidedDecodingParams(**self.guided_decoding)
        if isinstance(self.logit_bias, dict):
            # JSON object keys arrive as strings.
            try:
                self.logit_bias = {int(k): v for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise ValueError("invalid logit_bias: keys must be token ids") from None
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
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS), name, value,
                   f"an integer in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2.0 <= value <= 2.0, name, value, "a number in [-2, 2]")
        _check(_finite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0, "repetition_penalty",
               self.repetition_penalty, "a number in (0, 10]")
        bias = self.logit_bias
        _check(bias is None or (len(bias) <= MAX_LOGIT_BIAS_TOKENS and all(
            isinstance(k, int) and k >= 0 and _finite(v) and -100.0 <= v <= 100.0 for k, v in bias.items())),
            "logit_bias", f"<{len(bias or ())} entries>",
            f"at most {MAX_LOGIT_BIAS_TOKENS} token ids mapped to numbers in [-100, 100]")
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               self.min_tokens, f"an integer in [0, max_tokens={self.max_tokens}]")
        _check(self.guided_decoding is None or isinstance(self.guided_decoding, GuidedDecodingParams),
               "guided_decoding", type(self.guided_decoding).__name__, "a GuidedDecodingParams or dict")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes this request's logits."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"invalid {field}={value!r}: expected {expected}")
