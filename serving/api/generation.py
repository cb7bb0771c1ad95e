"""What the text endpoints share: tokenize, check the context window, charge the key, stream, account.

Every text endpoint (completions, chat, predict) is a list of prompts, each run with the same sampling
parameters and `n` samples. `GenerationJob` plans them (one replica request per prompt), and `events()`
merges their increments into one stream. Non-streamed responses are built by folding that same stream, so
the streamed text and the non-streamed text cannot disagree.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from serving.api.auth import KeyRecord
from serving.api.backends import LLMBackend
from serving.api.errors import invalid_input
from serving.api.metrics import Metrics
from serving.api.protocol import ChatMessage
from serving.api.ratelimit import RateLimiter, Reservation
from serving.engine.errors import PromptError
from serving.engine.prompts import check_context_window, encode_prompt
from serving.engine.prompts import encode_chat as encode_conversation

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Text up to this many characters is tokenized on the event loop (microseconds); more goes to the pool.
INLINE_TEXT_CHARS = 4096
# Tokenization, template rendering (and other request-sized work: logprob decoding) off the event loop, at
# most this many at once per ingress replica: a flood of large prompts queues here instead of stalling every
# stream and health check.
_TOKENIZER_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")


async def off_loop(small: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`: inline when the caller knows the work is `small`, else on the bounded pool."""
    if small:
        return fn(*args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZER_POOL, functools.partial(fn, *args, **kwargs))


async def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of raw prompts, each with the BOS token, as the engine's `encode` does."""
    try:
        return await off_loop(sum(map(len, texts)) <= INLINE_TEXT_CHARS,
                              lambda: [encode_prompt(tokenizer, text) for text in texts])
    except PromptError as exc:
        raise invalid_input(exc) from None


async def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage],
                      add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation under the model's chat template, as the engine's `encode_chat` does."""
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    size = sum(len(m["content"]) for m in conversation) + 16 * len(conversation)
    try:
        return await off_loop(size <= INLINE_TEXT_CHARS, encode_conversation, tokenizer, conversation,
                              add_generation_prompt)
    except PromptError as exc:
        raise invalid_input(exc) from None


@dataclass
class Choice:
    """The accumulated state of one completion (one prompt, one of its n samples)."""

    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    # With logprobs: every generated token and its {token id: log-probability} entry.
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """New text of completion `index` (prompt_index * n + sample index)."""

    index: int
    text: str
    num_new_tokens: int
    finish_reason: str | None
    prompt_index: int = 0
    # With logprobs: the new tokens and their entries.
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)


class GenerationJob:
    def __init__(self, llm: LLMBackend, metrics: Metrics, key: KeyRecord, prompts: list[list[int]],
                 max_tokens: int | None, default_max_tokens: int, sampling: dict[str, Any], n: int):
        """Validate the prompts against the context window and fix each one's max_tokens.

        An explicit `max_tokens` must fit next to every prompt (400 naming both counts otherwise); without
        one, each prompt gets `default_max_tokens` or what is left of the window, whichever is smaller.
        `max_tokens=0` scores the prompts only: the engine samples one token (the prefill's), which is
        dropped from text, logprobs and usage.
        """
        self.llm, self.metrics, self.key = llm, metrics, key
        self.prompts = prompts
        self.n = n
        self.sampling = sampling
        self.score_only = max_tokens == 0
        window = llm.info.max_model_len
        self.max_tokens: list[int] = []
        for i, ids in enumerate(prompts):
            which = f"prompt {i}" if len(prompts) > 1 else "prompt"
            try:
                check_context_window(len(ids), max_tokens, window, which)
            except PromptError as exc:
                raise invalid_input(exc) from None
            self.max_tokens.append(max(max_tokens, 1) if max_tokens is not None
                                   else min(default_max_tokens, window - len(ids)))
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.choices = [Choice() for _ in range(len(prompts) * n)]
        # Per prompt, with prompt_logprobs: its tokens' entries (None for the first), once the prefill is over.
        self.prompt_logprobs: list[list[dict[int, float] | None] | None] = [None] * len(prompts)
        self.request_id = uuid.uuid4().hex
        self._reservation: Reservation | None = None
        self._limiter: RateLimiter | None = None
        self._answered = False

    async def admit(self, limiter: RateLimiter) -> None:
        """Reserve the prompt and the most this job can generate on the key (429 when over its limits);
        `events` settles the reservation to what the job used when it ends."""
        budget = self.prompt_tokens + (0 if self.score_only else self.n * sum(self.max_tokens))
        self._reservation = await limiter.reserve(self.key, budget)
        self._limiter = limiter
        self.metrics.prompt_tokens.labels(self.llm.info.name, self.key.name).inc(self.prompt_tokens)

    async def _settle(self) -> None:
        if self._reservation is not None:
            # No answer (refused, failed, cancelled before the first token): only the request slot.
            used = self.prompt_tokens + self.completion_tokens if self._answered else 0
            await self._limiter.settle(self._reservation, used)

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    async def events(self) -> AsyncIterator[Event]:
        """All completions' increments, merged in arrival order; records token and latency metrics."""
        start = time.perf_counter()
        last_token_at: float | None = None
        name = self.llm.info.name
        streams = [
            self.llm.generate(f"{self.request_id}-{i}", ids, {**self.sampling, "n": self.n, "max_tokens": m})
            for i, (ids, m) in enumerate(zip(self.prompts, self.max_tokens))
        ]
        try:
            async with contextlib.aclosing(_merge(streams)) as merged:
                async for prompt_index, deltas in merged:
                    self._answered = True
                    now = time.perf_counter()
                    for delta in deltas:
                        if delta.prompt_logprobs is not None:
                            self.prompt_logprobs[prompt_index] = delta.prompt_logprobs
                        if self.score_only:
                            delta = replace(delta, text="", num_tokens=0, token_ids=None, logprobs=None)
                        choice = self.choices[prompt_index * self.n + delta.index]
                        new = delta.num_tokens - choice.num_tokens
                        choice.num_tokens = delta.num_tokens
                        choice.finish_reason = delta.finish_reason
                        choice.text.append(delta.text)
                        if delta.logprobs:
                            choice.token_ids.extend(delta.token_ids)
                            choice.logprobs.extend(delta.logprobs)
                        if new > 0:
                            if last_token_at is None:
                                self.metrics.ttft.labels(name).observe(now - start)
                            else:
                                gap = (now - last_token_at) / new
                                for _ in range(new):
                                    self.metrics.itl.labels(name).observe(gap)
                            last_token_at = now
                            self.metrics.generation_tokens.labels(name, self.key.name).inc(new)
                        yield Event(prompt_index * self.n + delta.index, delta.text, new, delta.finish_reason,
                                    prompt_index, delta.token_ids or [], delta.logprobs or [])
        finally:
            await self._settle()

    async def run(self) -> None:
        """Generate to the end without streaming (the texts accumulate in `choices`)."""
        async for _ in self.events():
            pass


async def primed(stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Start `stream` now: errors before its first item (bad input, full queue) raise here, before any
    response byte is sent, so they can still become an HTTP status. Returns a stream of all its items."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = None
        empty = True
    else:
        empty = False

    async def replay() -> AsyncIterator[T]:
        async with contextlib.aclosing(stream):
            if not empty:
                yield first
            async for item in stream:
                yield item

    return replay()


async def _merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several streams as their items arrive; the first error cancels the others."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    queue.put_nowait((i, item, None))
            queue.put_nowait((i, done, None))
        except Exception as exc:  # noqa: BLE001 (handed to the consumer, which raises it)
            queue.put_nowait((i, None, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is done:
                remaining -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
