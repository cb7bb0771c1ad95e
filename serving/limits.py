"""Every bound on what one request may ask for, in one table.

The HTTP schemas (serving/api/protocol.py) check these at the door, before anything is tokenized;
`SamplingParams` checks the same numbers for the offline API; the engine adds what only the model knows
(top_k and stop_token_ids against the vocabulary, prompt tokens against the context window and the KV pool).
A value outside a bound is an error naming the field, never work: each bound caps the CPU or memory one
request can cost (a stop string is searched at every step, a message is rendered by the template, a prompt
is tokenized), so the next odd input is refused before it can stall or crash anything.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestLimits:
    n: int = 16                           # completions per prompt
    prompts: int = 64                     # prompts (text predict inputs) per request; AppConfig may lower it
    embedding_inputs: int = 2048          # texts per embeddings request
    messages: int = 1024                  # chat messages per request
    text_chars: int = 1 << 20             # characters of all of one request's text, checked before tokenizing
    max_tokens: int = 1 << 20             # beyond any context window: a larger value is a typo, not a plan
    stop_strings: int = 16
    stop_chars: int = 256                 # per stop string
    stop_token_ids: int = 64
    logprobs: int = 20                    # top log-probabilities per token (and per prompt token)
    logit_bias_tokens: int = 300          # entries of logit_bias
    guided_choices: int = 256             # strings of guided_choice
    grammar_chars: int = 16384            # a guided_regex, or one guided_choice string (compiled per request)
    top_k: int = 1 << 20                  # the engine also checks top_k against its model's vocabulary
    temperature: float = 2.0
    seed: int = 2**63 - 1                 # seeds are int64 tensors in the sampler
    head_bytes: int = 64 * 1024           # request line and headers (the HTTP parser itself sets no bound)


LIMITS = RequestLimits()
