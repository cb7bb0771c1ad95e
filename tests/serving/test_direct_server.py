"""The ingress's own HTTP server (serving/api/server.py), in process: two servers share one port as two
ingress replicas do, a stopped one lets its request finish and leaves the port to the other, and a port
another program holds is refused."""
from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from serving.api.server import DirectServer, bind
from tests.fixtures.gateway import free_port


def _app(name: str, gate: asyncio.Event, held: list[str]) -> Starlette:
    async def who(request: Request) -> PlainTextResponse:
        if request.query_params.get("wait"):
            held.append(name)
            await gate.wait()
        return PlainTextResponse(name)

    return Starlette(routes=[Route("/", who)])


async def _started(server: DirectServer) -> None:
    while not server.server.started:
        await asyncio.sleep(0.01)


async def test_two_servers_share_a_port_and_stop_gracefully():
    port, gate, held_by = free_port(), asyncio.Event(), []
    a = DirectServer(_app("a", gate, held_by), "127.0.0.1", port, read_timeout_s=30)
    b = DirectServer(_app("b", gate, held_by), "127.0.0.1", port, read_timeout_s=30)
    await asyncio.gather(_started(a), _started(b))
    url = f"http://127.0.0.1:{port}/"
    answered = set()
    for _ in range(64):  # a fresh connection each: the kernel spreads them over both listeners
        async with httpx.AsyncClient() as client:
            answered.add((await client.get(url)).text)
        if len(answered) == 2:
            break
    assert answered == {"a", "b"}

    # A request held open on one server while it stops: it is answered whole, then that server is gone.
    async with httpx.AsyncClient() as client:
        held = asyncio.create_task(client.get(url + "?wait=1"))
        while not held_by:
            await asyncio.sleep(0.01)
        victim = a if held_by[0] == "a" else b
        stopping = asyncio.create_task(victim.stop(timeout_s=10))
        await asyncio.sleep(0.2)
        assert not held.done()
        gate.set()
        assert (await held).status_code == 200
        await stopping
    survivor = "b" if victim is a else "a"
    for _ in range(16):
        async with httpx.AsyncClient() as client:
            assert (await client.get(url)).text == survivor
    await (b if victim is a else a).stop(timeout_s=5)


def test_a_port_held_without_reuseport_is_refused():
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError):
            bind("127.0.0.1", other.getsockname()[1])
