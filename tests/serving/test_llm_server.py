"""The LLM replica class in-process (no Ray): its own admission bound, errors as values, abort on close, and
health reporting once the engine is gone."""
from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from serving.api.backends import error_for
from serving.api.errors import APIError, invalid_input
from serving.app_config import AppConfig
from serving.engine.errors import ContextWindowError, ErrorKind, ErrorResult
from serving.engine.prompts import check_context_window
from serving.outputs import Delta
from serving.replicas.llm_server import LLMServer


async def _server(model_dir: Path) -> LLMServer:
    return await LLMServer.create(AppConfig(model=str(model_dir), max_num_seqs=1, max_waiting_requests=1,
                                            num_kv_blocks=64, embedding_model="none", retry_after_s=7))


async def _only_item(stream, kind: ErrorKind) -> APIError:
    """The stream's one item, an error value of `kind`, as the ingress answers it (with retry_after_s=7)."""
    items = [item async for item in stream]
    assert len(items) == 1 and isinstance(items[0], ErrorResult) and items[0].kind is kind, items
    return error_for(items[0], 7)


async def test_admission_bound_errors_abort_and_health(tiny_chat_dir):
    server = await _server(tiny_chat_dir)
    info = await server.model_info()
    assert info["name"] == tiny_chat_dir.name and info["max_model_len"] == 4096
    ids = info["tokenizer"].encode("Hello there")

    running = server.generate("a", ids, {"max_tokens": 500, "ignore_eos": True})
    (first,) = await anext(running)
    assert (first.index, first.num_tokens, first.finish_reason) == (0, 1, None)
    waiting = server.generate("b", ids, {"max_tokens": 3, "ignore_eos": True})
    waiting_first = asyncio.create_task(anext(waiting))
    await asyncio.sleep(0.05)
    assert server.in_flight == 2 == server.capacity
    # Errors come back as the stream's last item (an exception would be logged by Ray at ERROR).
    full = await _only_item(server.generate("c", ids, {"max_tokens": 3}), ErrorKind.OVERLOADED)
    assert (full.status, full.code, full.retry_after) == (503, "queue_full", 7)

    # Closing the consumer (what a client disconnect does) aborts the request and frees its blocks.
    await running.aclose()
    await waiting_first
    async for _ in waiting:
        pass
    stats = await server.stats()
    assert stats["in_flight"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"] == 64
    assert stats["replica"] == "local"

    bad = await _only_item(server.generate("d", ids, {"max_tokens": 3, "temperature": -1.0}), ErrorKind.INVALID)
    assert bad.status == 400 and "temperature" in bad.message
    too_long = await _only_item(server.generate("e", ids, {"max_tokens": 5000}), ErrorKind.CONTEXT_WINDOW)
    # The same answer as when the ingress checks the window itself.
    with pytest.raises(ContextWindowError) as at_ingress:
        check_context_window(len(ids), 5000, info["max_model_len"])
    ingress = invalid_input(at_ingress.value)
    assert (too_long.status, too_long.code, too_long.message) == (400, "context_length_exceeded", ingress.message)
    assert ingress.code == "context_length_exceeded" and "4096" in too_long.message
    top_k = await _only_item(server.generate("g", ids, {"max_tokens": 3, "temperature": 1.0, "top_k": 10**5}),
                             ErrorKind.INVALID)
    assert top_k.status == 400 and "top_k" in top_k.message and "vocabulary" in top_k.message
    assert (await server.health())["healthy"]
    await server.check_health()

    await server.__del__()  # what Ray awaits once the replica has drained
    health = await server.health()
    assert not health["healthy"] and health["error"] == "EngineDeadError"
    with pytest.raises(Exception, match="shut down"):
        await server.check_health()
    dead = await _only_item(server.generate("f", ids, {"max_tokens": 3}), ErrorKind.UNAVAILABLE)
    assert (dead.status, dead.code, dead.retry_after) == (503, "replica_unavailable", 7)


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
    assert grouped[0][0].num_tokens == 1  # the first token still leaves alone, at once

    def text(items: list) -> str:
        return "".join(delta.text for item in items for delta in item)

    assert text(grouped) == text(single)
    last = [(item[-1][0].num_tokens, item[-1][0].finish_reason) for item in (grouped, single)]
    assert last == [(40, "length")] * 2
    await server.__del__()


def test_replica_code_does_not_import_the_http_layer():
    """Replicas answer with engine-level values; only the ingress knows HTTP (and its retry_after_s).
    (fastapi itself comes with ray.serve.)"""
    code = ("import sys, serving.replicas.llm_server, serving.replicas.embedding_server; "
            "print(sorted(m for m in sys.modules if m.startswith('serving.api')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_stream_items_cross_with_plain_pickle():
    """The ingress's handle asks Ray for plain pickle (serving.api.backends.streaming), which refuses what
    only cloudpickle can carry: every kind of item a replica streams must survive it."""
    delta = Delta(index=1, text="hé", num_tokens=3, finish_reason="length", token_ids=[5, 6],
                  logprobs=[{5: -0.1}, {6: -0.2}], prompt_logprobs=[None, {4: -1.5}])
    items = [[delta], ErrorResult(ErrorKind.OVERLOADED, "replica queue is full")]
    assert pickle.loads(pickle.dumps(items)) == items
