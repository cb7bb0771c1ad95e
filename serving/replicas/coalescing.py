"""Stream coalescing: an LLM replica's outputs for one request as `Delta`s, at a bounded item rate."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from serving.outputs import Delta, RequestOutput


@dataclass
class _Pending:
    """What one completion generated since its last item."""

    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None

    def delta(self, index: int) -> Delta:
        has_logprobs = bool(self.logprobs)
        return Delta(index=index, text=self.text, num_tokens=self.num_tokens, finish_reason=self.finish_reason,
                     token_ids=self.token_ids if has_logprobs else None,
                     logprobs=self.logprobs if has_logprobs else None, prompt_logprobs=self.prompt_logprobs)


async def coalesced(outputs: AsyncIterator[RequestOutput],
                    interval_s: Callable[[], float]) -> AsyncIterator[list[Delta]]:
    """The engine's outputs for one request as `Delta`s, at most one item per `interval_s()` seconds, each
    carrying everything generated since the previous one.

    The first token leaves at once, so time to first token is untouched; later tokens that arrive within
    the interval leave together in the next item.
    """
    pending: dict[int, _Pending] = {}
    num_logprobs_sent: dict[int, int] = {}
    prompt_sent = False
    ready, done = asyncio.Event(), asyncio.Event()
    failure: list[BaseException] = []

    async def pump() -> None:
        nonlocal prompt_sent
        try:
            async for out in outputs:
                for o in out.outputs:
                    entry = pending.setdefault(o.index, _Pending())
                    entry.text += o.delta_text
                    entry.num_tokens, entry.finish_reason = len(o.token_ids), o.finish_reason
                    if o.logprobs is not None:
                        sent = num_logprobs_sent.get(o.index, 0)
                        entry.token_ids.extend(o.token_ids[sent:])
                        entry.logprobs.extend(o.logprobs[sent:])
                        num_logprobs_sent[o.index] = len(o.logprobs)
                    # Complete once the first token is sampled (the prefill is over).
                    if o.index == 0 and out.prompt_logprobs is not None and not prompt_sent and o.token_ids:
                        entry.prompt_logprobs, prompt_sent = out.prompt_logprobs, True
                ready.set()
        except Exception as exc:  # noqa: BLE001 (handed to the consumer, which raises it)
            failure.append(exc)
        finally:
            done.set()
            ready.set()

    task = asyncio.create_task(pump())
    last_sent = float("-inf")
    try:
        while True:
            await ready.wait()
            wait = last_sent + interval_s() - time.monotonic()
            if wait > 0 and not done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), wait)
            ready.clear()
            if pending:
                batch = [entry.delta(index) for index, entry in pending.items()]
                pending.clear()
                last_sent = time.monotonic()
                yield batch
            if done.is_set() and not pending:
                if failure:
                    raise failure[0]
                return
    finally:
        # Cancelling the pump closes the engine stream, which aborts the request if it is still running.
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
