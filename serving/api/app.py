"""The FastAPI application of the ingress: middleware, error mapping, health, metrics and the routers.

Order of checks for a request: authentication and a key already over its limits (401 / 429, before the
body is even read), body size (413), JSON and schema with every bound of serving/limits.py (400/422),
model (404), tokenizing (off the event loop), token window (400), reserving the key's tokens (429),
queue (503).
Logs carry endpoint, status, key name, token counts and latency; never request or response bodies, and
never error messages of 4xx answers (they may quote the caller's input).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api import mosaic, openai
from serving.api.auth import ANONYMOUS
from serving.api.context import ApiContext
from serving.api.errors import APIError, error_body, unavailable

logger = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/metrics"})


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(title="mosaic-serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.to_response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return APIError(400, "the request body is not valid JSON", "invalid_json").to_response()
        # loc and msg only: pydantic's `input` would echo (possibly huge, possibly private) request content.
        detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                           for e in errors[:10])
        return APIError(422, f"invalid request: {detail}", "invalid_field").to_response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's own answers (no such route, wrong method, ...) and the body limit's 413.
        status, headers = exc.status_code, getattr(exc, "headers", None)
        code = {404: "unknown_route", 405: "method_not_allowed", 408: "request_timeout",
                413: "request_too_large"}.get(status)
        # The path is the caller's input: a bounded prefix of it.
        where = f"{request.method} {request.url.path[:100]}"
        if status == 404:
            message = f"no route for {where}"
        elif status == 405:
            allowed = (headers or {}).get("allow") or (headers or {}).get("Allow")
            message = f"method not allowed: {where}" + (f" (allowed: {allowed})" if allowed else "")
        else:
            message = exc.detail if isinstance(exc.detail, str) else "request failed"
        # 413 keeps its own type (as the body limit's up-front answer); every other 4xx is an invalid request.
        error_type = None if status == 413 else "invalid_request_error" if status < 500 else None
        return JSONResponse(error_body(status, message, code, error_type), status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        # The type only: an exception's text can carry request content.
        logger.error("internal error %s", type(exc).__name__)
        return JSONResponse(error_body(500, "internal server error", "internal_error"), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        checks = await asyncio.gather(*(b.health() for b in (ctx.llm, ctx.embedder) if b is not None))
        replicas = [r for results in checks for r in results]
        # Each model needs at least one healthy replica; Ray replaces the unhealthy ones.
        healthy = all(any(r.get("healthy") for r in results) for results in checks)
        return JSONResponse({"status": "ok" if healthy else "unhealthy", "replicas": replicas},
                            status_code=200 if healthy else 503,
                            headers=None if healthy else {"Retry-After": str(ctx.settings.retry_after_s)})

    @app.get("/metrics")
    async def metrics() -> Response:
        if ctx.llm is not None:
            ctx.metrics.set_engine_stats(await ctx.llm.stats())
        body, content_type = ctx.metrics.render()
        return Response(body, media_type=content_type)

    routers = [openai.build_router(ctx), mosaic.build_router(ctx)]
    for router in routers:
        app.include_router(router)
    # The routes themselves (FastAPI wraps included routers), to label requests answered before routing.
    routes = [r for router in (app.router, *routers) for r in router.routes if isinstance(r, APIRoute)]
    # Added last = outermost: access log, then auth, then the body limit, then FastAPI.
    app.add_middleware(BodyLimitMiddleware, max_bytes=ctx.settings.max_request_bytes,
                       timeout_s=ctx.settings.request_read_timeout_s)
    app.add_middleware(AuthMiddleware, ctx=ctx)
    app.add_middleware(AccessMiddleware, ctx=ctx, routes=routes)
    return app


class BodyLimitMiddleware:
    """413 (our JSON error) for a body over `max_bytes`: by Content-Length up front, else while reading; 408
    for a body not all received within `timeout_s` of the request reaching the app (a client trickling a
    body would otherwise hold its request, and a place among the replica's in-flight requests, for good)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body is larger than {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await JSONResponse(error_body(413, message, "request_too_large"), status_code=413)(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        received, complete = 0, False

        async def bounded_receive() -> Message:
            nonlocal received, complete
            if complete:
                # After the body, receive() waits for the client to go away (during a stream): no deadline.
                return await receive()
            try:
                event = await asyncio.wait_for(receive(), deadline - loop.time())
            except TimeoutError:
                # FastAPI passes an HTTPException raised while reading the body on to our handler.
                # The rest of the body may still come: close rather than parse it as the next request.
                raise HTTPException(408, f"request body not received within {self.timeout_s:g} s",
                                    headers={"connection": "close"}) from None
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, message)
                complete = not event.get("more_body", False)
            return event

        await self.app(scope, bounded_receive, send)


def _route_path(scope: Scope) -> str:
    """The path below the application's route prefix (Ray Serve passes it as the ASGI root_path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


class AuthMiddleware:
    """Resolves the API key before routing or body parsing; sets `request.state.key`."""

    def __init__(self, app: ASGIApp, ctx: ApiContext):
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _route_path(scope) in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if self.ctx.keys is None:
            state["key"] = ANONYMOUS
        else:
            header = dict(scope["headers"]).get(b"authorization")
            try:
                state["key"] = self.ctx.keys.authenticate(header.decode("latin-1") if header else None)
                # A key already out of requests or tokens is refused before its body is even read.
                await self.ctx.limiter.precheck(state["key"])
            except APIError as exc:
                await exc.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AccessMiddleware:
    """Counts and logs every request by endpoint (the route template), status and key name; while the
    server drains, refuses new ones (503, Retry-After) and counts those still being answered."""

    def __init__(self, app: ASGIApp, ctx: ApiContext, routes: Sequence[APIRoute]):
        self.app = app
        self.ctx = ctx
        self.metrics = ctx.metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        public = _route_path(scope) in PUBLIC_PATHS
        if self.ctx.draining and not public:
            response = unavailable("the server is shutting down; retry on another server or later",
                                   "shutting_down", self.ctx.settings.retry_after_s).to_response()
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        limit = self.ctx.max_in_flight
        if limit is not None and self.ctx.in_flight >= limit and not public:
            await unavailable(f"this ingress replica is answering {limit} requests; retry later",
                              "ingress_busy", self.ctx.settings.retry_after_s).to_response()(scope, receive, send)
            return
        self.ctx.in_flight += 1
        try:
            await self._served(scope, receive, send)
        finally:
            self.ctx.in_flight -= 1

    async def _served(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = self._endpoint(scope)
            key = scope.get("state", {}).get("key")
            key_name = key.name if key is not None else "-"
            latency = time.perf_counter() - start
            self.metrics.requests.labels(endpoint, str(status), key_name).inc()
            self.metrics.request_latency.labels(endpoint).observe(latency)
            if endpoint not in PUBLIC_PATHS:
                logger.info("%s %s %d key=%s %.1fms", scope["method"], endpoint, status, key_name, latency * 1e3)

    def _endpoint(self, scope: Scope) -> str:
        """The route template of the request; "unmatched" for a path no route has (bounded label values)."""
        route = scope.get("route")
        if route is None:
            # Answered before routing (a 401 or 429 from AuthMiddleware, a 413): the route the path is for.
            route = next((r for r in self.routes if r.matches(scope)[0] is not Match.NONE), None)
        return getattr(route, "path", None) or "unmatched"
