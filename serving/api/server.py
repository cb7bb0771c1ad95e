"""The ingress replica's own HTTP server: the ASGI app on the user-facing port, without Ray Serve's proxy.

Through the proxy a request costs two actor calls before the app sees its body (the request, then the body
fetched back from the proxy) and every response message one more on the way out: about 14 ms of the first
token at one client. Here the client's connection ends in the ingress replica itself. Every ingress replica
on a node binds the same address with SO_REUSEPORT, and the kernel spreads new connections over them; a
replica that Ray replaces binds it again when its constructor is done (so it is only reachable once ready).

Nothing in front of this server bounds what a client may hold, so it bounds that itself: uvicorn's HTTP
parser waits forever for a request's headers (a connection that sends nothing, or a header a byte at a
time, stays open: enough of them and the replica runs out of file descriptors) and keeps headers of any size
(190 MB of them grew the ingress by as much). `BoundedHeadProtocol` gives every request's line and headers
a deadline and a size; the body's deadline is BodyLimitMiddleware's (serving/api/app.py).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import socket
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.limits import LIMITS

logger = logging.getLogger(__name__)

# As Ray Serve's proxy keeps idle client connections (its default keep_alive_timeout_s).
KEEP_ALIVE_S = 90


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port that the node's other ingress replicas can bind too (OSError if another
    program holds the port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a request whose head is over its bound."""


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with each request's line and headers due within `head_timeout_s` of
    the connection being made (on a kept-alive connection: of the request's first byte; between requests
    uvicorn's keep-alive timeout applies) and at most LIMITS.head_bytes long. Beyond either the client gets
    408 or 431 and the connection is closed."""

    def __init__(self, *args: Any, head_timeout_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s
        self.head_deadline: asyncio.TimerHandle | None = None
        self.head_bytes = 0   # of the current request's line and headers (reset by _start_head)
        self.refusal: tuple[int, str] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.head_deadline is None:   # a kept-alive connection's next request
            self._start_head()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._end_head()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers every parser error here, the one _count_head raises included.
        if self.refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(*self.refusal)

    def _start_head(self) -> None:
        self.head_bytes = 0
        self.head_deadline = self.loop.call_later(self.head_timeout_s, self._refuse, 408, "Request Timeout")

    def _end_head(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _count_head(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > LIMITS.head_bytes:
            self.refusal = (431, "Request Header Fields Too Large")
            raise _HeadRefused

    def _refuse(self, status: int, reason: str) -> None:
        self._end_head()
        if not self.transport.is_closing():
            self.transport.write(f"HTTP/1.1 {status} {reason}\r\nconnection: close\r\n"
                                 "content-length: 0\r\n\r\n".encode("ascii"))
            self.transport.close()


class DirectServer:
    """uvicorn serving `app` on host:port in the running event loop, until `stop`; a request's head and body
    are each due within `read_timeout_s`."""

    def __init__(self, app: ASGIApp, host: str, port: int, read_timeout_s: float):
        self.sock = bind(host, port)
        protocol = functools.partial(BoundedHeadProtocol, head_timeout_s=read_timeout_s)
        self.server = uvicorn.Server(uvicorn.Config(
            app, http=protocol, lifespan="off", access_log=False, log_config=None,  # type: ignore[arg-type]
            timeout_keep_alive=KEEP_ALIVE_S))
        # Ray owns the replica's signals; uvicorn would take them from it.
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        logger.info("serving HTTP on %s:%d", host, port)

    async def stop(self, timeout_s: float) -> None:
        """Stop listening, then give the connections' requests up to `timeout_s` to finish."""
        self.server.config.timeout_graceful_shutdown = timeout_s
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout_s + 1.0)
        except TimeoutError:
            logger.warning("HTTP server still had connections after %.0f s", timeout_s)
