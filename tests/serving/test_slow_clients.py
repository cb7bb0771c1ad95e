"""Clients that hold a connection without finishing a request: silent, trickling a head or a body, or sending
endless headers. Each is cut off within the stack's request_read_timeout_s (a 408, or 431 for the headers),
the replica's memory and in-flight slots are not theirs to keep, and other clients are answered meanwhile.
All cases run at once, against the real stack's ingress port."""
from __future__ import annotations

import asyncio
import json
import time

import httpx

MODEL = "tiny-llama-2-chat"
BODY = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()


async def _open(stack) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", stack.port)


async def _answer(reader: asyncio.StreamReader, limit_s: float) -> tuple[int, bytes, float]:
    """The status and body of what the server sends before it closes the connection, and when it closed."""
    start, data = time.monotonic(), b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), limit_s):   # until EOF: the server closed
            data += chunk
    except ConnectionResetError:
        pass   # closed with the client's bytes unread (the endless headers): a reset, maybe before the answer
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            body = body[:int(value)]
    return status, body, time.monotonic() - start


async def _answer_while_sending(stack, chunks: list[bytes], gap_s: float, limit_s: float):
    """_answer on a new connection while `chunks` go out `gap_s` apart (until the server closes it)."""
    reader, writer = await _open(stack)

    async def send() -> None:
        try:
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(gap_s)
        except ConnectionError:
            pass   # the server closed it: what the test expects

    sender = asyncio.create_task(send())
    try:
        return await _answer(reader, limit_s)
    finally:
        sender.cancel()


def _request_head(stack, body_length: int) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {body_length}\r\n\r\n").encode()


def _bytes(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


async def _silent(stack, limit_s):
    reader, _ = await _open(stack)
    return await _answer(reader, limit_s)


async def _trickled_head(stack, limit_s):
    return await _answer_while_sending(stack, _bytes(_request_head(stack, 10)), 0.2, limit_s)


async def _trickled_body(stack, limit_s):
    return await _answer_while_sending(stack, [_request_head(stack, len(BODY))] + _bytes(BODY), 0.5, limit_s)


async def _kept_alive_then_partial(stack, limit_s):
    """A whole request, answered; then on the same connection the next request's first line only."""
    reader, writer = await _open(stack)
    writer.write(_request_head(stack, len(BODY)) + BODY)
    await writer.drain()
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    assert first.startswith(b"HTTP/1.1 200"), first[:100]
    length = next(int(line.split(b":")[1]) for line in first.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    writer.write(b"POST /v1/completions HTTP/1.1\r\n")
    await writer.drain()
    return await _answer(reader, limit_s)


async def _endless_headers(stack, limit_s):
    line = b"X-Pad: " + b"a" * 8000 + b"\r\n"
    chunks = [b"GET /health HTTP/1.1\r\nHost: x\r\n"] + [line] * 2000
    return await _answer_while_sending(stack, chunks, 0, limit_s)


async def _meanwhile(stack) -> list[int]:
    """Ordinary requests while the slow clients hold their connections."""
    statuses = []
    async with httpx.AsyncClient(base_url=stack.base_url, headers=stack.headers(), timeout=60) as client:
        for _ in range(3):
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4})
            statuses.append(r.status_code)
            await asyncio.sleep(1)
    return statuses


def test_slow_and_silent_clients_are_cut_off(serving_stack):
    timeout_s = serving_stack.config.request_read_timeout_s
    limit_s = timeout_s + 30   # the case fails (TimeoutError) if the server never closes

    async def run():
        return await asyncio.gather(
            _silent(serving_stack, limit_s), _trickled_head(serving_stack, limit_s),
            _trickled_body(serving_stack, limit_s), _kept_alive_then_partial(serving_stack, limit_s),
            _endless_headers(serving_stack, limit_s), _meanwhile(serving_stack))

    silent, head, body, kept_alive, headers, meanwhile = asyncio.run(run())
    for name, (status, _, after_s) in {"silent": silent, "trickled head": head,
                                        "kept-alive partial head": kept_alive}.items():
        assert status == 408, name
        assert after_s >= timeout_s * 0.9, name
    status, payload, after_s = body
    assert status == 408 and after_s >= timeout_s * 0.9
    assert json.loads(payload)["error"]["code"] == "request_timeout"
    # At the size bound, long before the deadline (the 16 MB are sent within it). The answer can be lost:
    # closing a connection with unread bytes makes TCP reset it, which may discard what was sent before.
    status, _, after_s = headers
    assert status in (431, 0) and after_s < timeout_s / 2
    assert meanwhile == [200, 200, 200]
    # Nothing of theirs is still held: a plain request is answered.
    r = httpx.post(f"{serving_stack.base_url}/v1/completions", headers=serving_stack.headers(), timeout=60,
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200
