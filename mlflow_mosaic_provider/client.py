"""HTTP client for the serving tier: shared keep-alive sessions, bounded retries, SSE relay, error mapping.

Every failure leaves this module as a `fastapi.HTTPException` carrying the status the gateway answers
with (and `Retry-After` where waiting helps). MLflow's routes pass such exceptions to FastAPI as they
are, while its own `AIGatewayException` would lose the headers on the way.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import random
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from fastapi import HTTPException

from mlflow_mosaic_provider.config import MosaicConfig
from mlflow_mosaic_provider.metrics import FAILOVERS, REQUESTS
from mlflow_mosaic_provider.regions import Region, Regions

_logger = logging.getLogger(__name__)

# Upstream answers worth another try: the key or the replica is momentarily saturated.
_RETRYABLE_STATUS = frozenset({429, 503})
_BACKOFF_BASE_S = 0.25
_BACKOFF_CAP_S = 4.0
# Below the serving tier's own keep-alive (Ray Serve and uvicorn close idle sockets after 5 s), so
# the gateway drops an idle connection before the server does and never writes into a closing one.
_KEEPALIVE_S = 4.0
# Large enough for one SSE line or error body; aiohttp's default (64 KiB) splits long lines.
_READ_BUFSIZE = 2**20

T = TypeVar("T")
LoopCache = weakref.WeakKeyDictionary  # event loop -> {key: object bound to that loop}; forgets dead loops


def loop_local(cache: LoopCache, key: Any, factory: Callable[[], T]) -> T:
    """The object stored under `key` for the running loop, built by `factory` on first use."""
    per_loop = cache.setdefault(asyncio.get_running_loop(), {})
    value = per_loop.get(key)
    if value is None:
        value = per_loop[key] = factory()
    return value


_SESSIONS: LoopCache = LoopCache()


def shared_session(base_url: str) -> aiohttp.ClientSession:
    """The keep-alive session for `base_url` on the running loop.

    MLflow builds a provider per request on its `/v1` routes, so sessions cannot live on the
    provider; aiohttp sessions are bound to one loop, so they cannot be process-wide either.
    """
    session = loop_local(_SESSIONS, base_url, _new_session)
    if session.closed:
        session = _SESSIONS[asyncio.get_running_loop()][base_url] = _new_session()
    return session


def _new_session() -> aiohttp.ClientSession:
    # No connection cap here: the per-endpoint `max_concurrent_requests` is the admission control,
    # and a hidden pool limit would queue requests where no timeout or error reports it.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_KEEPALIVE_S)
    return aiohttp.ClientSession(connector=connector, read_bufsize=_READ_BUFSIZE)


async def close_sessions() -> None:
    """Close this loop's shared sessions (for orderly shutdown and tests)."""
    sessions = _SESSIONS.pop(asyncio.get_running_loop(), {})
    for session in sessions.values():
        await session.close()


def gateway_error(status: int, message: str, retry_after: float | None = None) -> HTTPException:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return HTTPException(status_code=status, detail=message, headers=headers)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None if absent or invalid."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(body: bytes, reason: str) -> str:
    """The message of an upstream error body: our `{"error": {"message"}}`, FastAPI's `detail`, or text."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip() or reason
    match parsed:
        case {"error": {"message": str(message)}} | {"error": str(message)} | {"detail": str(message)}:
            return message
        case {"message": str(message)}:
            return message
    return json.dumps(parsed) if parsed else reason


# The serving tier's error `type`s, for error events that carry no numeric code.
_STATUS_OF_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "service_unavailable": 503,
}


def _stream_error(error: Any) -> HTTPException:
    """The HTTP error an SSE `{"error": ...}` event stands for (502 when it does not say)."""
    if not isinstance(error, dict):
        return gateway_error(502, str(error))
    code = error.get("code")
    status = (
        code if isinstance(code, int) and 400 <= code < 600 else _STATUS_OF_TYPE.get(error.get("type"), 502)
    )
    return gateway_error(
        _upstream_status(status), str(error.get("message") or "the serving tier reported an error")
    )


def _upstream_status(status: int) -> int:
    # A crash inside the serving tier is a bad gateway from the caller's view, not the gateway's own 500.
    return 502 if status in (500, 501) else status


class _Failure(Exception):
    """An attempt that failed.

    `retryable`: another attempt on the same region may succeed (after a backoff). `failover`: the region
    itself failed (refused or dropped connection, timeout, 503), so the next region is tried at once.
    """

    def __init__(
        self,
        error: HTTPException,
        retryable: bool,
        retry_after: float | None = None,
        failover: str | None = None,
    ):
        super().__init__(error.detail)
        self.error = error
        self.retryable = retryable
        self.retry_after = retry_after
        self.failover = failover  # why the region failed (a metric label), or None when it answered


def _region_lost(status: int, message: str, reason: str) -> _Failure:
    """The region went away mid-answer (`reason`: timeout or reset): not retried there, failed over."""
    return _Failure(gateway_error(status, message), retryable=False, failover=reason)


def _lost_while_reading(error: TimeoutError | aiohttp.ClientError, what: str) -> _Failure:
    """The region went silent (a timeout) or dropped the connection while sending `what`."""
    # aiohttp's read timeouts are ClientErrors too: a timeout first.
    if isinstance(error, TimeoutError):
        return _region_lost(504, f"the serving tier went silent on {what}", "timeout")
    return _region_lost(502, f"the serving tier dropped {what} ({type(error).__name__})", "reset")


R = TypeVar("R")


class MosaicClient:
    """Calls the serving tier's OpenAI-compatible API for one endpoint config, over its regions in order."""

    def __init__(self, config: MosaicConfig, endpoint: str = "") -> None:
        self._endpoint = endpoint
        self._regions = Regions(config.api_bases, config.region_cooldown_s)
        self._headers = {"Content-Type": "application/json"}
        if config.mosaic_api_key is not None:
            self._headers["Authorization"] = f"Bearer {config.mosaic_api_key.get_secret_value()}"
        self._max_retries = config.max_retries
        self._retry_budget_s = config.retry_budget_s
        self._json_timeout = aiohttp.ClientTimeout(
            total=config.request_timeout_s, connect=config.connect_timeout_s
        )
        # A stream may run for long; what must stay short is the silence between two chunks.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout_s, sock_read=config.stream_idle_timeout_s
        )

    def __repr__(self) -> str:
        return f"MosaicClient(regions={[r.base_url for r in self._regions.regions]!r})"

    async def post_json(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST and return the JSON body of a successful answer."""

        async def read(response: aiohttp.ClientResponse) -> dict[str, Any]:
            try:
                body = await response.read()
            except (TimeoutError, aiohttp.ClientError) as e:
                raise _lost_while_reading(e, f"the {path} answer") from None
            finally:
                response.release()
            try:
                return json.loads(body)
            except ValueError:
                raise gateway_error(502, f"the serving tier sent a non-JSON answer to {path}") from None

        return await self._exchange(path, payload, self._json_timeout, read)

    async def post_stream(self, path: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST with `stream: true` and yield each SSE event's JSON as soon as it arrives.

        Errors before the first event raise (the caller can still answer with a real status, and a
        region that fails before it is failed over); an error event or a stream cut before `[DONE]`
        raises mid-iteration.
        """

        async def first_event(response: aiohttp.ClientResponse):
            events = _stream_events(response, path)
            try:
                return events, await anext(events, None)
            except BaseException:
                await events.aclose()
                raise

        events, first = await self._exchange(path, payload, self._stream_timeout, first_event)
        try:
            if first is None:
                return
            yield first
            async for event in events:
                yield event
        except _Failure as failure:
            raise failure.error from None
        finally:
            await events.aclose()

    async def _exchange(
        self,
        path: str,
        payload: dict[str, Any],
        timeout: aiohttp.ClientTimeout,
        start: Callable[[aiohttp.ClientResponse], Awaitable[R]],
    ) -> R:
        """Send, then `start` reading the answer (its body, or a stream's first event). A region that
        fails before `start` is done (nothing has reached the client yet) is failed over, once per region."""
        tried: list[Region] = []
        while True:
            response, served_by = await self._send(path, payload, timeout, avoid=tried)
            try:
                result = await start(response)
            except _Failure as failure:
                tried.append(served_by)
                if failure.failover is None or not self._regions.any_besides(tried):
                    self._record(served_by, failure.error.status_code)
                    raise failure.error from None
                self._region_failed(served_by, failure, path)
                continue
            except HTTPException as e:
                self._record(served_by, e.status_code)
                raise
            self._record(served_by, 200)
            return result

    def _record(self, served_by: Region, status: int) -> None:
        REQUESTS.labels(self._endpoint, served_by.base_url, str(status)).inc()
        if served_by is not self._regions.regions[0]:
            _logger.info("endpoint %s: region %s answered %d", self._endpoint, served_by.base_url, status)

    def _region_failed(self, region: Region, failure: _Failure, path: str) -> None:
        cooldown = failure.retry_after if failure.error.status_code == 503 and failure.retry_after else None
        region.failed(cooldown or self._regions.cooldown_s, f"{failure.failover} on {path}")
        FAILOVERS.labels(self._endpoint, region.base_url, failure.failover).inc()

    async def _send(
        self,
        path: str,
        payload: dict[str, Any],
        timeout: aiohttp.ClientTimeout,
        avoid: list[Region],
    ) -> tuple[aiohttp.ClientResponse, Region]:
        """One logical request: the regions in order, failing over at once; then retries of refused
        connections and 429/503 within the retry budget. Returns the response and the region that sent it."""
        deadline = time.monotonic() + self._retry_budget_s
        attempt = 0
        while True:
            try:
                return await self._round(path, payload, timeout, avoid)
            except _Failure as failure:
                delay = failure.retry_after
                if delay is None:
                    # Full jitter keeps several gateway workers from retrying in lockstep.
                    delay = random.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**attempt))
                if (
                    not failure.retryable
                    or attempt >= self._max_retries
                    or time.monotonic() + delay > deadline
                ):
                    raise failure.error from None
                attempt += 1
                _logger.info(
                    "retrying %s (attempt %d) in %.2fs after %s",
                    path,
                    attempt,
                    delay,
                    failure.error.status_code,
                )
                await asyncio.sleep(delay)

    async def _round(
        self, path: str, payload: dict[str, Any], timeout: aiohttp.ClientTimeout, avoid: list[Region]
    ) -> tuple[aiohttp.ClientResponse, Region]:
        """Each region once, best first, until one answers. Raises the best region's failure."""
        first: _Failure | None = None
        for region in self._regions.order(avoid):
            region.begin(time.monotonic(), self._regions.cooldown_s)
            try:
                response = await self._attempt(region.base_url, path, payload, timeout)
            except _Failure as failure:
                if failure.failover is None:
                    region.succeeded()  # it answered: up, though it refused this request
                    raise
                self._region_failed(region, failure, path)
                first = first or failure
                continue
            region.succeeded()
            return response, region
        assert first is not None, "a round has at least one region"
        raise first

    async def _attempt(
        self, base: str, path: str, payload: dict[str, Any], timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        try:
            response = await shared_session(base).post(
                base + path, json=payload, headers=self._headers, timeout=timeout, allow_redirects=False
            )
        except TimeoutError:
            raise _region_lost(504, f"the serving tier did not answer {path} in time", "timeout") from None
        except aiohttp.ClientConnectorError:
            # Nothing was sent, so trying again is always safe.
            raise _Failure(
                gateway_error(503, f"cannot connect to the serving tier at {base}", retry_after=1),
                retryable=True,
                failover="connect",
            ) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            raise _Failure(
                gateway_error(502, f"the serving tier reset the connection ({type(e).__name__})"),
                retryable=True,
                failover="reset",
            ) from None
        except aiohttp.ClientError as e:
            raise gateway_error(502, f"request to the serving tier failed ({type(e).__name__})") from None
        if response.status < 400:
            return response
        try:
            body = await response.read()
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        finally:
            response.release()
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        status = _upstream_status(response.status)
        error = gateway_error(
            status,
            _error_message(body, response.reason or str(response.status)),
            retry_after if status in _RETRYABLE_STATUS else None,
        )
        raise _Failure(
            error,
            retryable=status in _RETRYABLE_STATUS,
            retry_after=retry_after,
            failover="503" if status == 503 else None,
        )


async def _stream_events(response: aiohttp.ClientResponse, path: str) -> AsyncIterator[dict[str, Any]]:
    """The JSON of each SSE event until `[DONE]`; failures raise `_Failure` (with `failover` set where the
    region went away: dropped connection, silence, a 503 error event, an end without `[DONE]`)."""
    done = False
    try:
        async for event in _sse_events(response):
            if event == b"[DONE]":
                done = True
                return
            try:
                data = json.loads(event)
            except ValueError:
                raise _Failure(
                    gateway_error(502, f"the serving tier sent a malformed {path} stream event"), retryable=False
                ) from None
            if isinstance(data, dict) and "error" in data:
                error = _stream_error(data["error"])
                raise _Failure(error, retryable=False, failover="503" if error.status_code == 503 else None)
            yield data
        raise _region_lost(502, f"the serving tier ended the {path} stream before [DONE]", "reset")
    except (TimeoutError, aiohttp.ClientError) as e:
        raise _lost_while_reading(e, f"the {path} stream") from None
    finally:
        # Closing (not releasing) an unfinished stream drops the connection, which is how the
        # serving tier learns the client left and frees the request's KV blocks.
        if done:
            response.release()
        else:
            response.close()


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The `data` of each server-sent event, yielded the moment its closing blank line arrives."""
    data: list[bytes] = []
    async for raw in response.content:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield b"\n".join(data)
                data = []
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        # Comments (`:`), `event:`, `id:` and `retry:` carry nothing the relay needs.
    if data:
        yield b"\n".join(data)
