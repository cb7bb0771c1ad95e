"""Per-request sampling settings (contract: names follow vLLM). Bounds come from serving.limits."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from serving.limits import LIMITS


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
        _check(self.choice is None or (isinstance(self.choice, list) and 0 < len(self.choice) <= LIMITS.guided_choices
                                       and all(isinstance(c, str) and c for c in self.choice)),
               "guided_decoding.choice", "...", f"1 to {LIMITS.guided_choices} non-empty strings")

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
        _check(self.stop is None or isinstance(self.stop, (list, tuple)), "stop", self.stop,
               "a string or a list of strings")
        _check(self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)), "stop_token_ids",
               self.stop_token_ids, "a list of token ids")
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
        _check(_int(self.n) and 1 <= self.n <= LIMITS.n, "n", self.n, f"an integer in [1, {LIMITS.n}]")
        _check(_finite(self.temperature) and 0.0 <= self.temperature <= LIMITS.temperature, "temperature",
               self.temperature, f"a number in [0, {LIMITS.temperature}]")
        _check(_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", self.top_p, "a number in (0, 1]")
        _check(_int(self.top_k) and (self.top_k == -1 or 1 <= self.top_k <= LIMITS.top_k), "top_k", self.top_k,
               f"-1 (disabled) or an integer in [1, {LIMITS.top_k}]")
        _check(_int(self.max_tokens) and 1 <= self.max_tokens <= LIMITS.max_tokens, "max_tokens", self.max_tokens,
               f"an integer in [1, {LIMITS.max_tokens}]")
        _check(len(self.stop) <= LIMITS.stop_strings
               and all(isinstance(s, str) and 0 < len(s) <= LIMITS.stop_chars for s in self.stop),
               "stop", f"<{len(self.stop)} strings>",
               f"up to {LIMITS.stop_strings} non-empty strings of at most {LIMITS.stop_chars} characters")
        _check(len(self.stop_token_ids) <= LIMITS.stop_token_ids
               and all(_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               f"<{len(self.stop_token_ids)} ids>", f"up to {LIMITS.stop_token_ids} non-negative token ids")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "a boolean")
        _check(self.seed is None or (_int(self.seed) and 0 <= self.seed <= LIMITS.seed), "seed", self.seed,
               f"an integer in [0, {LIMITS.seed}]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_int(value) and 0 <= value <= LIMITS.logprobs), name, value,
                   f"an integer in [0, {LIMITS.logprobs}]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2.0 <= value <= 2.0, name, value, "a number in [-2, 2]")
        _check(_finite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0, "repetition_penalty",
               self.repetition_penalty, "a number in (0, 10]")
        bias = self.logit_bias
        _check(bias is None or (isinstance(bias, dict) and len(bias) <= LIMITS.logit_bias_tokens and all(
            _int(k) and k >= 0 and _finite(v) and -100.0 <= v <= 100.0 for k, v in bias.items())),
            "logit_bias", f"<{len(bias or ())} entries>",
            f"at most {LIMITS.logit_bias_tokens} token ids mapped to numbers in [-100, 100]")
        _check(_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
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


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        # Bounded: the value may be a huge caller-supplied number or string.
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ValueError(f"invalid {field}={shown}: expected {expected}")
