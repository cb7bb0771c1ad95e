"""Stream coalescing without an engine: the first token is never held back, later ones wait their turn."""
from __future__ import annotations

import asyncio

from serving.outputs import CompletionOutput, RequestMetrics, RequestOutput
from serving.replicas.coalescing import coalesced


def _output(token_ids: list[int], text: str) -> RequestOutput:
    completion = CompletionOutput(index=0, text=text, token_ids=token_ids, finish_reason=None, delta_text=text[-1:],
                                  delta_token_ids=token_ids[-1:])
    return RequestOutput("r", None, [1], [completion], finished=False, num_cached_tokens=0,
                         metrics=RequestMetrics(arrival_time=0.0))


async def test_the_first_token_leaves_while_the_engine_is_still_busy():
    more = asyncio.Event()

    async def engine():
        yield _output([7], "a")
        await more.wait()  # the next step has not finished
        yield _output([7, 8], "ab")
        yield _output([7, 8, 9], "abc")

    # An interval far longer than the test: only the first item may leave without waiting for it.
    stream = coalesced(engine(), lambda: 60.0)
    (first,) = await asyncio.wait_for(anext(stream), timeout=30)
    assert (first.text, first.num_tokens) == ("a", 1)
    more.set()
    # The next two tokens are one item, sent when the engine's stream ends rather than after 60 s.
    (rest,) = await asyncio.wait_for(anext(stream), timeout=30)
    assert (rest.text, rest.num_tokens) == ("bc", 3)
    assert [item async for item in stream] == []
