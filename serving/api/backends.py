"""The ingress's view of the model deployments: Ray Serve deployment handles plus error mapping.

Failures of the Ray layer become HTTP errors here: a full caller-side queue (`BackPressureError`) and a
replica that died or is being replaced are 503 with Retry-After, which clients can retry. A generation whose
replica died before it produced anything is retried once on another replica, so killing a replica costs
in-flight streams at most, not the requests queued behind them.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle
from transformers import PreTrainedTokenizerBase

from serving.api.errors import CONTEXT_LENGTH_EXCEEDED, APIError, bad_request, unavailable
from serving.engine.errors import ErrorKind, ErrorResult
from serving.outputs import Delta

logger = logging.getLogger(__name__)


def streaming(handle: DeploymentHandle) -> DeploymentHandle:
    """`handle` for streaming calls over Ray Serve's direct gRPC channel to the replica, with plain pickle.

    By reference (Ray's default) every streamed item is a Ray object: the replica reports it to the
    caller's core worker, which resolves it and hands it to the caller's loop. Over the gRPC server every
    replica runs for calls between deployments, an item is one message on an open stream: the first token
    arrives sooner (README, load benchmark) and every later item costs less CPU on both ends. The items (`Delta`, `ErrorResult`) are plain dataclasses, so
    pickle needs nothing from cloudpickle. A replica that goes away still surfaces as a `RayActorError`
    (`ActorUnavailableError`), so the retry before the first token holds.
    """
    return handle.options(stream=True, _by_reference=False, request_serialization="pickle",
                          response_serialization="pickle")


_REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


@dataclass
class LLMInfo:
    name: str
    max_model_len: int
    tokenizer: PreTrainedTokenizerBase


@dataclass
class EmbeddingInfo:
    name: str
    dimensions: int
    max_input_tokens: int
    tokenizer: PreTrainedTokenizerBase


def error_for(result: ErrorResult, retry_after: int) -> APIError:
    """The HTTP error for a replica's answer that it could not serve the request."""
    if result.kind is ErrorKind.OVERLOADED:
        return unavailable(result.message, "queue_full", retry_after)
    if result.kind is ErrorKind.UNAVAILABLE:
        return unavailable(result.message, "replica_unavailable", retry_after)
    if result.kind is ErrorKind.FAILED:
        return APIError(500, result.message, "request_failed")
    if result.kind is ErrorKind.CONTEXT_WINDOW:
        return bad_request(result.message, CONTEXT_LENGTH_EXCEEDED)
    return bad_request(result.message)


def queue_full(retry_after: int) -> APIError:
    return unavailable("all replicas are busy and the queue is full; retry later", "queue_full", retry_after)


def map_ray_error(exc: BaseException, retry_after: int) -> APIError | None:
    """The HTTP error for a failure of the Ray layer, or None if `exc` is not one."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BackPressureError):
        return queue_full(retry_after)
    if isinstance(exc, _REPLICA_GONE):
        return unavailable("the replica serving this request went away; retry", "replica_unavailable", retry_after)
    return None


class _Backend:
    def __init__(self, handle: DeploymentHandle, retry_after: int):
        self._handle = handle
        self.retry_after = retry_after

    async def _broadcast(self, method: str, timeout_s: float) -> list[Any]:
        """`method` on every replica: its result or the exception it raised. While the deployment has no
        running replica at all (being replaced) that is one exception."""
        try:
            return await self._handle.broadcast(method).results_async(timeout_s=timeout_s, return_exceptions=True)
        except (RayServeException, RayError, TimeoutError) as exc:
            return [exc]

    async def health(self, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """Every replica's own account of its health (a replica that does not answer is unhealthy)."""
        results = await self._broadcast("health", timeout_s)
        return [r if isinstance(r, dict) else {"healthy": False, "error": type(r).__name__} for r in results]


class LLMBackend(_Backend):
    """`max_outstanding`: generations this ingress replica passes to the handle at once (what the replicas
    run and queue plus the handle's own queue); more are refused 503 here. Ray's router checks its queue
    bound before it counts a request as queued, so a burst arriving in one tick (as on the ingress's own
    port, without the proxy's pacing) would overshoot it."""

    def __init__(self, handle: DeploymentHandle, info: LLMInfo, retry_after: int, max_outstanding: int | None = None):
        super().__init__(handle, retry_after)
        self._stream = streaming(handle)
        self.info = info
        self.max_outstanding = max_outstanding
        self.outstanding = 0

    @classmethod
    async def connect(cls, handle: DeploymentHandle, retry_after: int,
                      max_outstanding: int | None = None) -> LLMBackend:
        info = await handle.model_info.remote()
        return cls(handle, LLMInfo(**info), retry_after, max_outstanding)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: dict[str, Any]) -> AsyncIterator[list[Delta]]:
        """Stream a request's increments from an LLM replica; raises APIError for every failure mode."""
        if self.max_outstanding is not None and self.outstanding >= self.max_outstanding:
            raise queue_full(self.retry_after)
        self.outstanding += 1
        try:
            # Closed at once when the consumer leaves, so the replica-side request is cancelled now.
            async with contextlib.aclosing(self._generate(request_id, prompt_token_ids, params)) as stream:
                async for deltas in stream:
                    yield deltas
        finally:
            self.outstanding -= 1

    async def _generate(self, request_id: str, prompt_token_ids: list[int],
                        params: dict[str, Any]) -> AsyncIterator[list[Delta]]:
        for attempt in (1, 2):
            response = self._stream.generate.remote(request_id, prompt_token_ids, params)
            started = ended = False
            try:
                async for deltas in response:
                    if isinstance(deltas, ErrorResult):
                        # The replica's answer for this request (see LLMServer.generate).
                        raise error_for(deltas, self.retry_after)
                    started = True
                    yield deltas
                ended = True
                return
            except Exception as exc:
                ended = True
                error = map_ray_error(exc, self.retry_after)
                if error is None:
                    raise
                if error.code == "replica_unavailable" and not started and attempt == 1:
                    logger.warning("request %s: replica died before the first token; retrying", request_id)
                    continue
                raise error from None
            finally:
                if not ended:
                    # The consumer left early (client disconnect, cancellation): abort the replica-side
                    # request so the engine frees its KV blocks. Best effort: cancel() re-raises a failure
                    # the response already holds.
                    with contextlib.suppress(Exception):
                        response.cancel()

    async def stats(self, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        return [r for r in await self._broadcast("stats", timeout_s) if isinstance(r, dict)]


class EmbeddingBackend(_Backend):
    def __init__(self, handle: DeploymentHandle, info: EmbeddingInfo, retry_after: int):
        super().__init__(handle, retry_after)
        self.info = info

    @classmethod
    async def connect(cls, handle: DeploymentHandle, retry_after: int) -> EmbeddingBackend:
        info = await handle.info.remote()
        return cls(handle, EmbeddingInfo(**info), retry_after)

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        try:
            result = await self._handle.embed.remote(texts)
        except Exception as exc:
            error = map_ray_error(exc, self.retry_after)
            if error is None:
                raise
            raise error from None
        if isinstance(result, ErrorResult):
            raise error_for(result, self.retry_after)
        return result
