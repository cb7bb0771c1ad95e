"""A small aiohttp server that speaks the serving tier's OpenAI-style API, with scripted misbehaviour.

It runs in a thread of the test process, so a real `mlflow gateway start` subprocess can call it while
tests script its next answers and read what it received. Answers are deterministic functions of the
request, so a test can compute the expected text itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TEXT_MODEL = "fake-chat"
EMBEDDING_MODEL = "fake-embed"
EMBEDDING_DIM = 8
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


@dataclass
class Reply:
    """How to answer the next request that carries a given marker in its text."""

    status: int = 200
    message: str = "scripted failure"
    retry_after: str | None = None
    delay_s: float = 0.0  # before the status line goes out
    chunk_delay_s: float = 0.0  # between stream chunks
    cut_after: int | None = None  # stream: drop the connection after this many chunks, no [DONE]
    error_after: int | None = None  # stream: send an error event after this many chunks
    hang_after: int | None = None  # stream: go silent after this many chunks
    raw: tuple[bytes, ...] = ()  # stream: send these pieces verbatim instead of the generated chunks
    reset: bool = False  # drop the connection without answering


@dataclass
class Received:
    path: str
    authorization: str | None
    body: dict[str, Any]
    peer_port: int
    aborted: bool = False  # the client went away before the answer ended
    started: float = field(default_factory=time.monotonic)


def generate(text: str, max_tokens: int) -> list[str]:
    """The fake model's output tokens for a prompt: words picked by a hash of the prompt."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return [" " + _WORDS[(seed + 7 * i) % len(_WORDS)] for i in range(max_tokens)]


def embed(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [(b - 128) / 128 for b in digest[:EMBEDDING_DIM]]


def chat_prompt(messages: list[dict]) -> str:
    def text(content: str | list[dict]) -> str:
        # Text parts join without a separator, as in the serving tier.
        return content if isinstance(content, str) else "".join(part["text"] for part in content)

    return "\n".join(f"{m['role']}: {text(m['content'])}" for m in messages)


def _error(status: int, message: str, retry_after: str | None = None) -> web.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    body = {
        "error": {"message": message, "type": "scripted" if status != 401 else "auth_error", "code": status}
    }
    return web.json_response(body, status=status, headers=headers)


class FakeServing:
    """Start with `start()`; `script(marker, *replies)` queues answers for requests mentioning `marker`."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.received: list[Received] = []
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-serving", daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def script(self, marker: str, *replies: Reply) -> None:
        with self._lock:
            self._scripts[marker].extend(replies)

    def requests_mentioning(self, marker: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if marker in json.dumps(r.body)]

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, shutdown_timeout=1.0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def _next_reply(self, text: str) -> Reply:
        with self._lock:
            for marker, queue in self._scripts.items():
                if marker in text and queue:
                    return queue.popleft()
        return Reply()

    async def _admit(self, request: web.Request, text_of) -> tuple[dict, Received, Reply] | web.Response:
        body = await request.json()
        record = Received(
            path=request.path,
            authorization=request.headers.get("Authorization"),
            body=body,
            peer_port=request.transport.get_extra_info("peername")[1],
        )
        with self._lock:
            self.received.append(record)
        reply = self._next_reply(text_of(body))
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
            if request.transport is None or request.transport.is_closing():
                record.aborted = True
        if reply.reset:
            request.transport.close()
            return web.Response(status=499)
        if record.authorization not in (f"Bearer {self.api_key}", self.api_key):
            return _error(401, "invalid API key")
        if reply.status != 200:
            return _error(reply.status, reply.message, reply.retry_after)
        return body, record, reply

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        admitted = await self._admit(request, lambda b: b.get("prompt", ""))
        if isinstance(admitted, web.Response):
            return admitted
        body, record, reply = admitted
        prompt = body["prompt"]
        tokens = generate(prompt, body.get("max_tokens", 16))
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(tokens)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        head = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body["model"],
        }
        if not body.get("stream"):
            choice = {"index": 0, "text": "".join(tokens), "finish_reason": "length"}
            return web.json_response({**head, "choices": [choice], "usage": usage})
        chunks = [
            {
                **head,
                "choices": [
                    {"index": 0, "text": t, "finish_reason": None if i < len(tokens) - 1 else "length"}
                ],
            }
            for i, t in enumerate(tokens)
        ]
        return await self._stream(
            request, record, reply, chunks, {**head, "choices": [], "usage": usage}, body
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        admitted = await self._admit(request, lambda b: chat_prompt(b.get("messages", [])))
        if isinstance(admitted, web.Response):
            return admitted
        body, record, reply = admitted
        prompt = chat_prompt(body["messages"])
        tokens = generate(prompt, body.get("max_tokens", 16))
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(tokens)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        head = {"id": "chatcmpl-fake", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(tokens)}
            choice = {"index": 0, "message": message, "finish_reason": "length"}
            return web.json_response(
                {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
            )
        head["object"] = "chat.completion.chunk"
        chunks = [
            {
                **head,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": t} if i == 0 else {"content": t},
                        "finish_reason": None if i < len(tokens) - 1 else "length",
                    }
                ],
            }
            for i, t in enumerate(tokens)
        ]
        return await self._stream(
            request, record, reply, chunks, {**head, "choices": [], "usage": usage}, body
        )

    async def _embeddings(self, request: web.Request) -> web.Response:
        def text_of(body: dict) -> str:
            value = body.get("input", "")
            return value if isinstance(value, str) else " ".join(map(str, value))

        admitted = await self._admit(request, text_of)
        if isinstance(admitted, web.Response):
            return admitted
        body, _, _ = admitted
        inputs = [body["input"]] if isinstance(body["input"], str) else body["input"]
        data = [{"object": "embedding", "index": i, "embedding": embed(t)} for i, t in enumerate(inputs)]
        tokens = sum(len(t.split()) for t in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.json_response({"object": "list", "data": data, "model": body["model"], "usage": usage})

    async def _stream(
        self,
        request: web.Request,
        record: Received,
        reply: Reply,
        chunks: list[dict],
        usage_chunk: dict,
        body: dict,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            if reply.raw:
                for piece in reply.raw:
                    await response.write(piece)
                    await asyncio.sleep(0.01)
                await response.write_eof()
                return response
            for i, chunk in enumerate(chunks):
                if i == reply.cut_after:
                    request.transport.close()
                    return response
                if i == reply.error_after:
                    error = {
                        "error": {"message": "replica failed mid-stream", "type": "scripted", "code": 503}
                    }
                    await response.write(f"data: {json.dumps(error)}\n\n".encode())
                    await response.write_eof()
                    return response
                if i == reply.hang_after:
                    # Silent until the client gives up and closes the connection.
                    while not request.transport.is_closing():
                        await asyncio.sleep(0.05)
                    record.aborted = True
                    return response
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if reply.chunk_delay_s:
                    await asyncio.sleep(reply.chunk_delay_s)
            if (body.get("stream_options") or {}).get("include_usage"):
                await response.write(f"data: {json.dumps(usage_chunk)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            record.aborted = True
            raise
        return response
