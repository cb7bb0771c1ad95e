"""Incremental detokenisation with stop strings.

Each new token is decoded together with a small window of the tokens before it, and the text it adds is
the difference to the window decoded alone (two decodes per token, independent of the output length). The
window starts in the prompt, so a sentencepiece token like "▁Hello" keeps its leading space (decoding the
output alone would strip it); while the decoded text ends in an incomplete character (U+FFFD from
byte-fallback tokens) nothing is emitted, so streamed pieces never split a multi-byte character.

Stop strings are searched on the decoded text, and the text is cut before the first match. While a request
streams, a suffix that could still grow into a stop string is held back, so streamed increments always
concatenate to the final text. Both checks cost what the new text costs, not what the whole output does:
the search starts a stop string's length before the new chunk, and the held-back length is kept by one
Knuth-Morris-Pratt matcher per stop string, advanced over each new character once.

With `min_tokens`, stop strings are not searched until more than `min_tokens` tokens were added (vLLM's
semantics, like the EOS ban in the sampler): a stop string within the first tokens' text does not end the
output, one that ends in a later token's text does (even when it starts earlier).
"""
from __future__ import annotations

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

# Prompt tokens the first window starts with: enough for a multi-byte character at the seam.
_PROMPT_CONTEXT_TOKENS = 8
_INCOMPLETE = "\ufffd"
# A UTF-8 character has at most 4 bytes: more unread tokens than that are not one character in the making
# but invalid bytes, which are then emitted as U+FFFD rather than held back forever.
_MAX_CHAR_TOKENS = 4


def backend_tokenizer(tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: the engine needs a tokenizer.json "
            "(save the tokenizer with a recent transformers to create one)"
        )
    return backend


class IncrementalDetokenizer:
    __slots__ = (
        "_backend",
        "_matchers",
        "_min_tokens",
        "_num_matched_chars",
        "_num_read",
        "_num_sent_chars",
        "_num_tokens",
        "_read_text",
        "_stop",
        "_window",
        "text",
    )

    def __init__(self, backend: Tokenizer, prompt_token_ids: list[int], stop: list[str], min_tokens: int = 0):
        self._backend = backend
        # Token window: [0, _num_read) are already turned into text (decoding to _read_text), the rest not.
        self._window = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._num_read = len(self._window)
        self._read_text = self._decode(self._window)
        self._stop = stop
        self._min_tokens = min_tokens
        self._num_tokens = 0   # tokens added
        self._matchers = [_PrefixMatcher(s) for s in stop]
        self._num_matched_chars = 0   # characters of `text` the matchers have consumed
        self.text = ""
        self._num_sent_chars = 0

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=True)

    def add_token(self, token_id: int) -> bool:
        """Decode one generated token; True when the text now contains a stop string (it is cut there)."""
        self._window.append(token_id)
        self._num_tokens += 1
        full = self._decode(self._window)
        if full.endswith(_INCOMPLETE) and len(self._window) - self._num_read < _MAX_CHAR_TOKENS:
            return False
        return self._append(self._advance(full))

    def _advance(self, full: str) -> str:
        """The text `full` adds to the read part; then the unread tokens become the new read part."""
        read = self._read_text
        # Usually `full` extends `read`; when the new token completes a character whose first bytes were
        # read already, the two differ from that character on.
        common = len(read) if full.startswith(read) else _common_prefix_len(read, full)
        self._window = self._window[self._num_read:]
        self._num_read = len(self._window)
        self._read_text = self._decode(self._window)
        return full[common:]

    def _append(self, chunk: str) -> bool:
        if not chunk:
            return False
        start = len(self.text)
        self.text += chunk
        if not self._stop or self._num_tokens <= self._min_tokens:
            return False
        # Only a match ending in the new chunk can be new (earlier ones were cut, or ignored under min_tokens).
        cut = min((i for i in (self.text.find(s, max(0, start - len(s) + 1)) for s in self._stop) if i >= 0),
                  default=-1)
        if cut < 0:
            return False
        self.text = self.text[:cut]
        return True

    def flush(self) -> bool:
        """At the end: emit what an incomplete character held back (as U+FFFD); True on a stop string."""
        return self._num_read < len(self._window) and self._append(self._advance(self._decode(self._window)))

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while unfinished, minus a tail that may be the start of a stop string."""
        end = len(self.text) if finished else len(self.text) - self._pending_stop_prefix()
        delta = self.text[self._num_sent_chars:end]
        self._num_sent_chars = max(end, self._num_sent_chars)
        return delta

    @property
    def sent_text(self) -> str:
        return self.text[:self._num_sent_chars]

    def _pending_stop_prefix(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        if not self._matchers:
            return 0
        new = self.text[self._num_matched_chars:]
        self._num_matched_chars = len(self.text)
        return max(matcher.feed(new) for matcher in self._matchers)


class _PrefixMatcher:
    """Knuth-Morris-Pratt over a growing text: the longest proper prefix of `pattern` the text ends with.

    The text fed contains the whole pattern only where a match is ignored (under min_tokens; otherwise the
    text is cut there and finished): the state then falls back to the longest proper prefix that the text
    ends with. Each character costs amortized O(1).
    """

    __slots__ = ("_failure", "_pattern", "_state")

    def __init__(self, pattern: str):
        self._pattern = pattern
        self._state = 0
        failure = [0] * len(pattern)
        k = 0
        for i in range(1, len(pattern)):
            while k and pattern[i] != pattern[k]:
                k = failure[k - 1]
            if pattern[i] == pattern[k]:
                k += 1
            failure[i] = k
        self._failure = failure

    def feed(self, text: str) -> int:
        pattern, failure, k = self._pattern, self._failure, self._state
        last = len(pattern) - 1
        for char in text:
            while k and (k > last or char != pattern[k]):
                k = failure[k - 1]
            if char == pattern[k]:
                k += 1
        # A full match (an ignored one) is not pending; fall back to the longest proper prefix.
        if k > last:
            k = failure[last]
        self._state = k
        return k


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
