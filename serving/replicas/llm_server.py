"""One LLM replica: an AsyncLLMEngine plus this replica's admission bound and stream coalescing.

Health: Ray calls `check_health` every `health_check_period_s`; it raises when the engine loop died or made
no step for `stall_timeout_s` while it had work, and Ray replaces the replica.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any

from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.errors import (
    ContextWindowError,
    EngineDeadError,
    EngineStalledError,
    ErrorKind,
    ErrorResult,
    RequestFailedError,
)
from serving.outputs import Delta
from serving.replicas.coalescing import coalesced
from serving.replicas.process import enter_replica, node_id
from serving.sampling_params import SamplingParams

if TYPE_CHECKING:
    from serving.app_config import AppConfig

logger = logging.getLogger(__name__)

# However busy the replica, a stream still moves at least a few times a second.
_MAX_STREAM_INTERVAL_S = 0.25


class LLMServer:
    """Every method that touches the engine is `async def`: Ray Serve runs sync methods on a thread pool, and
    the engine must only be touched from its event loop's thread.

    Built in two steps, `LLMServer(config)` then `await server.start()` (or `await LLMServer.create(config)`);
    Ray Serve builds `serving.deployment.LLMReplica`, whose async constructor does both.
    """

    def __init__(self, config: AppConfig):
        self.replica = enter_replica(config.llm_num_cpus)
        self.node = node_id()
        self.engine = AsyncLLMEngine(config.engine_config())
        self.capacity = config.replica_capacity
        self.stream_items_per_s = config.stream_items_per_s
        self.in_flight = 0

    @classmethod
    async def create(cls, config: AppConfig) -> LLMServer:
        server = cls(config)
        await server.start()
        return server

    async def start(self) -> None:
        await self.engine.start()
        logger.info("LLM replica %s serving %s (max_model_len=%d, capacity=%d)", self.replica,
                    self.engine.model_name, self.engine.max_model_len, self.capacity)

    async def model_info(self) -> dict[str, Any]:
        return {"name": self.engine.model_name, "max_model_len": self.engine.max_model_len,
                "tokenizer": self.engine.tokenizer}

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: dict[str, Any]) -> AsyncIterator[list[Delta] | ErrorResult]:
        """Stream lists of `Delta` (new text, tokens, logprobs per completion) for one request (see
        `coalesced`); a failure is the last item, an ErrorResult.

        When the consumer goes away (client disconnect, cancelled handle call) the generator is closed,
        which closes the engine's stream and aborts the request: its KV blocks are freed.
        """
        # Errors are the stream's last item, not exceptions: Ray logs an exception raised by a replica
        # method at ERROR with its traceback, which for a full queue or a bad value is noise.
        if self.in_flight >= self.capacity:
            yield ErrorResult(ErrorKind.OVERLOADED, f"replica queue is full ({self.capacity} requests)")
            return
        self.in_flight += 1
        try:
            params = SamplingParams(**params)
            outputs = self.engine.generate(prompt_token_ids, params, request_id)
            async for deltas in coalesced(outputs, self._stream_interval):
                yield deltas
        except EngineDeadError:
            yield ErrorResult(ErrorKind.UNAVAILABLE, "this replica's engine is down; it is being replaced")
        except RequestFailedError as exc:
            # Not retried anywhere: on another replica the same request would fail the same way.
            yield ErrorResult(ErrorKind.FAILED, str(exc))
        except ContextWindowError as exc:
            # Its own kind, so the client gets the code the ingress gives when it checks the window itself.
            yield ErrorResult(ErrorKind.CONTEXT_WINDOW, str(exc))
        except ValueError as exc:
            yield ErrorResult(ErrorKind.INVALID, str(exc))
        finally:
            self.in_flight -= 1

    def _stream_interval(self) -> float:
        """Seconds between two items of one stream: this replica's streams share `stream_items_per_s`.

        Every item crossing to the ingress, and on to the proxy and the client, costs serialization and a
        message at each hop. At one item per token per stream that cost grows with concurrency until the
        serving path needs more CPU than the engine; sharing a fixed item rate keeps it bounded. One stream
        alone still gets every token as it comes; under load tokens travel in small groups.
        """
        if not self.stream_items_per_s:
            return 0.0
        return min(_MAX_STREAM_INTERVAL_S, self.in_flight / self.stream_items_per_s)

    async def check_health(self) -> None:
        self.engine.check_health()

    async def health(self) -> dict[str, Any]:
        try:
            self.engine.check_health()
        except (EngineDeadError, EngineStalledError) as exc:
            return {"replica": self.replica, "node": self.node, "model": self.engine.model_name, "healthy": False,
                    "error": type(exc).__name__}
        return {"replica": self.replica, "node": self.node, "model": self.engine.model_name, "healthy": True}

    async def stats(self) -> dict[str, Any]:
        stats = self.engine.stats()
        return {"replica": self.replica, "model": self.engine.model_name, "in_flight": self.in_flight,
                **vars(stats)}

    def __del__(self) -> Awaitable[None] | None:
        """Ray calls this once the replica has drained its in-flight requests (up to
        graceful_shutdown_timeout_s), on the replica's event loop, and awaits what it returns: the engine's
        shutdown. Garbage collection calls it too; by then the engine is down and there is nothing to do."""
        engine = getattr(self, "engine", None)
        return engine.shutdown() if engine is not None and not engine.is_dead else None
