"""The LLM replica class in-process (built the way Ray Serve builds it): its own admission bound, error
mapping, abort on close, and health reporting once the engine is gone."""
from __future__ import annotations

import asyncio

import pytest

from serving.api.errors import APIError
from serving.deployment import AppConfig, LLMServer


async def _server(model_dir) -> LLMServer:  # noqa: ANN001
    server = object.__new__(LLMServer)  # Serve allocates, then awaits the async constructor
    await server.__init__(AppConfig(model=str(model_dir), max_num_seqs=1, max_waiting_requests=1,
                                    num_kv_blocks=64, embedding_model="none"))
    return server


async def test_admission_bound_errors_abort_and_health(tiny_chat_dir):
    server = await _server(tiny_chat_dir)
    info = await server.model_info()
    assert info["name"] == tiny_chat_dir.name and info["max_model_len"] == 4096
    ids = info["tokenizer"].encode("Hello there")

    running = server.generate("a", ids, {"max_tokens": 500, "ignore_eos": True})
    (index, text, num_tokens, finish), = await anext(running)
    assert (index, num_tokens, finish) == (0, 1, None)
    waiting = server.generate("b", ids, {"max_tokens": 3, "ignore_eos": True})
    waiting_first = asyncio.create_task(anext(waiting))
    await asyncio.sleep(0.05)
    assert server.in_flight == 2 == server.capacity
    with pytest.raises(APIError) as full:
        await anext(server.generate("c", ids, {"max_tokens": 3}))
    assert (full.value.status, full.value.code, full.value.retry_after) == (503, "queue_full", 1)

    # Closing the consumer (what a client disconnect does) aborts the request and frees its blocks.
    await running.aclose()
    await waiting_first
    async for _ in waiting:
        pass
    stats = await server.stats()
    assert stats["in_flight"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"] == 64
    assert stats["replica"] == "local"

    with pytest.raises(APIError) as bad:
        await anext(server.generate("d", ids, {"max_tokens": 3, "temperature": -1.0}))
    assert bad.value.status == 400 and "temperature" in bad.value.message
    with pytest.raises(APIError) as too_long:
        await anext(server.generate("e", ids, {"max_tokens": 5000}))
    assert too_long.value.status == 400 and "4096" in too_long.value.message
    assert (await server.health())["healthy"]
    await server.check_health()

    await server.__del__()  # what Ray calls once the replica has drained
    health = await server.health()
    assert not health["healthy"] and health["error"] == "EngineDeadError"
    with pytest.raises(Exception, match="shut down"):
        await server.check_health()
    with pytest.raises(APIError) as dead:
        await anext(server.generate("f", ids, {"max_tokens": 3}))
    assert (dead.value.status, dead.value.code) == (503, "replica_unavailable")
