"""The ingress replica's own HTTP server: the ASGI app on the user-facing port, without Ray Serve's proxy.

Through the proxy a request costs two actor calls before the app sees its body (the request, then the body
fetched back from the proxy) and every response message one more on the way out: about 14 ms of the first
token at one client. Here the client's connection ends in the ingress replica itself. Every ingress replica
on a node binds the same address with SO_REUSEPORT, and the kernel spreads new connections over them; a
replica that Ray replaces binds it again when its constructor is done (so it is only reachable once ready).
"""
from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn
from starlette.types import ASGIApp

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


class DirectServer:
    """uvicorn serving `app` on host:port in the running event loop, until `stop`."""

    def __init__(self, app: ASGIApp, host: str, port: int):
        self.sock = bind(host, port)
        self.server = uvicorn.Server(uvicorn.Config(
            app, lifespan="off", access_log=False, log_config=None, timeout_keep_alive=KEEP_ALIVE_S))
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
