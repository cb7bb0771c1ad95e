"""OpenAI's logprobs shapes, built from the engine's per-token {token id: log-probability} entries.

A token's text is what it adds after the tokens before it: each candidate is decoded behind a few tokens
of context and the context's own text is cut off (sentencepiece tokens keep their leading space that way;
decoding a token alone would drop it). All decodes of a response go to the tokenizer in one batch.
"""
from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

from serving.api.protocol import CompletionLogprobs, TokenLogprob, TopLogprob

_CONTEXT_TOKENS = 4
# JSON has no -inf; OpenAI and vLLM send this instead.
_FLOOR = -9999.0
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

Entry = dict[int, float] | None


def _ranked(entry: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda item: -item[1])


def _candidate_texts(tokenizer: PreTrainedTokenizerBase, context: list[int], token_ids: list[int],
                     candidates: list[list[int]]) -> list[list[str]]:
    """texts[i][j]: the text candidates[i][j] adds at position i, after context + token_ids[:i]."""
    history = context + token_ids
    batch: list[list[int]] = []
    for i, ids in enumerate(candidates):
        pos = len(context) + i
        window = history[max(0, pos - _CONTEXT_TOKENS):pos]
        batch.append(window)
        batch.extend(window + [c] for c in ids)
    decoded = tokenizer.backend_tokenizer.decode_batch(batch, skip_special_tokens=True)
    texts, j = [], 0
    for ids in candidates:
        base = decoded[j]
        texts.append([d.removeprefix(base) for d in decoded[j + 1:j + 1 + len(ids)]])
        j += 1 + len(ids)
    return texts


def completion_logprobs(tokenizer: PreTrainedTokenizerBase, context: list[int], token_ids: list[int],
                        entries: list[Entry], first_offset: int) -> CompletionLogprobs:
    """Legacy completions logprobs of `token_ids` (preceded by `context`); offsets start at `first_offset`.
    An entry of None (the first prompt token) gives null log-probabilities."""
    ranked = [_ranked(e) if e is not None else [] for e in entries]
    candidates = [[token_id] + [t for t, _ in r] for token_id, r in zip(token_ids, ranked)]
    texts = _candidate_texts(tokenizer, context, token_ids, candidates)
    out = CompletionLogprobs()
    offset = first_offset
    for token_id, entry, r, t in zip(token_ids, entries, ranked, texts):
        out.tokens.append(t[0])
        out.text_offset.append(offset)
        offset += len(t[0])
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(max(entry[token_id], _FLOOR))
        top: dict[str, float] = {}
        for text, (_, lp) in zip(t[1:], r):
            top.setdefault(text, max(lp, _FLOOR))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, context: list[int], token_ids: list[int],
                  entries: list[dict[int, float]], top_k: int) -> list[TokenLogprob]:
    """Chat completions `logprobs.content` of `token_ids`: each with its `top_k` most likely alternatives."""
    ranked = [_ranked(e)[:top_k] for e in entries]
    candidates = [[token_id] + [t for t, _ in r] for token_id, r in zip(token_ids, ranked)]
    texts = _candidate_texts(tokenizer, context, token_ids, candidates)
    pieces = tokenizer.convert_ids_to_tokens([c for ids in candidates for c in ids])
    content, j = [], 0
    for token_id, entry, r, t in zip(token_ids, entries, ranked, texts):
        p = pieces[j:j + len(t)]
        j += len(t)
        alternatives = [TopLogprob(token=text, logprob=max(lp, _FLOOR), bytes=_bytes(text, piece))
                        for text, (_, lp), piece in zip(t[1:], r, p[1:])]
        content.append(TokenLogprob(token=t[0], logprob=max(entry[token_id], _FLOOR), bytes=_bytes(t[0], p[0]),
                                    top_logprobs=alternatives))
    return content


def _bytes(text: str, piece: str | None) -> list[int]:
    """UTF-8 bytes of the token; a byte-fallback token (<0xE2>) is its single byte."""
    match = _BYTE_PIECE.match(piece or "")
    return [int(match.group(1), 16)] if match else list(text.encode("utf-8"))
