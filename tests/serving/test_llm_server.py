"""The LLM replica class in-process (built the way Ray Serve builds it): its own admission bound, error
mapping, abort on close, and health reporting once the engine is gone."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from serving.api.errors import APIError
from serving.deployment import AppConfig, LLMServer


async def _server(model_dir: Path) -> LLMServer:
    server = object.__new__(LLMServer)  # Serve allocates, then awaits the async constructor
    await server.__init__(AppConfig(model=str(model_dir), max_num_seqs=1, max_waiting_requests=1,
                                    num_kv_blocks=64, embedding_model="none"))
    return server


async def _only_item(stream) -> APIError:
    items = [item async for item in stream]
    assert len(items) == 1 and isinstance(items[0], APIError), items
    return items[0]


async def test_admission_bound_errors_abort_and_health(tiny_chat_dir):
    server = await _server(tiny_chat_dir)
    info = await server.model_info()
    assert info["name"] == tiny_chat_dir.name and info["max_model_len"] == 4096
    ids = info["tokenizer"].encode("Hello there")

    running = server.generate("a", ids, {"max_tokens": 500, "ignore_eos": True})
    (index, _, num_tokens, finish, *_), = await anext(running)
    assert (index, num_tokens, finish) == (0, 1, None)
    waiting = server.generate("b", ids, {"max_tokens": 3, "ignore_eos": True})
    waiting_first = asyncio.create_task(anext(waiting))
    await asyncio.sleep(0.05)
    assert server.in_flight == 2 == server.capacity
    # Errors come back as the stream's last item (an exception would be logged by Ray at ERROR).
    full = await _only_item(server.generate("c", ids, {"max_tokens": 3}))
    assert (full.status, full.code, full.retry_after) == (503, "queue_full", 1)

    # Closing the consumer (what a client disconnect does) aborts the request and frees its blocks.
    await running.aclose()
    await waiting_first
    async for _ in waiting:
        pass
    stats = await server.stats()
    assert stats["in_flight"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"] == 64
    assert stats["replica"] == "local"

    bad = await _only_item(server.generate("d", ids, {"max_tokens": 3, "temperature": -1.0}))
    assert bad.status == 400 and "temperature" in bad.message
    too_long = await _only_item(server.generate("e", ids, {"max_tokens": 5000}))
    assert too_long.status == 400 and "4096" in too_long.message
    top_k = await _only_item(server.generate("g", ids, {"max_tokens": 3, "temperature": 1.0, "top_k": 10**5}))
    assert top_k.status == 400 and "top_k" in top_k.message and "vocabulary" in top_k.message
    assert (await server.health())["healthy"]
    await server.check_health()

    await server.__del__()  # what Ray awaits once the replica has drained
    health = await server.health()
    assert not health["healthy"] and health["error"] == "EngineDeadError"
    with pytest.raises(Exception, match="shut down"):
        await server.check_health()
    dead = await _only_item(server.generate("f", ids, {"max_tokens": 3}))
    assert (dead.status, dead.code) == (503, "replica_unavailable")


async def test_busy_streams_travel_in_groups_with_the_same_text(tiny_chat_dir):
    server = await _server(tiny_chat_dir)
    ids = (await server.model_info())["tokenizer"].encode("Group me")
    params = {"max_tokens": 40, "ignore_eos": True, "temperature": 0.0}

    async def run(request_id: str) -> list:
        return [item async for item in server.generate(request_id, ids, params)]

    server.stream_items_per_s = 0  # one item per engine step
    single = await run("one-by-one")
    server.stream_items_per_s = 10  # one stream in flight: an item per 0.1 s at most
    grouped = await run("grouped")
    assert len(single) >= 30  # (two steps may land between two reads on a loaded machine)
    assert 1 < len(grouped) <= 10
    assert grouped[0][0][2] == 1  # the first token still leaves alone, at once
    def text(items: list) -> str:
        return "".join(delta[1] for item in items for delta in item)

    assert text(grouped) == text(single)
    assert grouped[-1][0][2:4] == single[-1][0][2:4] == (40, "length")
    await server.__del__()
