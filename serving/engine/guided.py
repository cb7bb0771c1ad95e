"""Structured output with xgrammar: compiled grammars (cached), one matcher per sequence, a bitmask per step.

A request's `GuidedDecodingParams` compiles once into a grammar over the model's vocabulary; xgrammar's
compiler caches compiled grammars by their source, so repeated schemas cost a lookup. Each sequence gets its
own matcher; every step the matchers of the step's constrained sequences write their rows of one
[rows, ceil(V / 32)] int32 bitmask, which the sampler applies to all those rows in one op, and each sampled
token is fed back to its matcher. JSON schemas and `json_object` compile to compact JSON (no free
whitespace between tokens), so a model cannot wander off into endless whitespace.
"""
from __future__ import annotations

import json
import threading
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from serving.sampling_params import GuidedDecodingParams


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:  # pragma: no cover (a declared dependency; this names it if it is missing)
        raise ValueError("structured output needs the xgrammar package (pip install xgrammar)") from None
    return xgrammar


class GrammarCompiler:
    """Compiles guided-decoding requests for one tokenizer and vocabulary size (thread-safe)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._lock = threading.Lock()
        self._compiler: Any = None

    def _get(self) -> Any:
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
            return self._compiler

    def compile(self, guide: GuidedDecodingParams) -> Any:
        """The compiled grammar (from the cache when seen before); ValueError naming the field if invalid."""
        compiler = self._get()
        kind, source = guide.key()
        try:
            if kind == "json":
                return compiler.compile_json_schema(source, any_whitespace=False)
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(source)
            # Choices as string literals of an EBNF grammar (JSON string escapes are EBNF's too).
            return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in guide.choice))
        except (RuntimeError, ValueError) as exc:
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ValueError(f"invalid guided_decoding.{kind}: {reason}") from None


def new_matcher(compiled: Any) -> Any:
    """A matcher at the start of a compiled grammar (one per sequence: it holds the parse state)."""
    return _xgrammar().GrammarMatcher(compiled)


def fill_bitmask(matchers: list[Any], vocab_size: int) -> torch.Tensor:
    """[len(matchers), ceil(V / 32)] int32: row i allows the tokens matcher i accepts next."""
    xgr = _xgrammar()
    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
    for i, matcher in enumerate(matchers):
        matcher.fill_next_token_bitmask(bitmask, i)
    return bitmask
