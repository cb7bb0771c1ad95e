"""The Ray Serve application: a FastAPI ingress, LLM replicas running the async engine, embedding replicas.

    HTTP proxy ──► Ingress (auth, limits, tokenize, SSE) ──handles, streaming──► LLMServer × R
                                                       └──────────────────────► EmbeddingServer × E

Backpressure, per LLM replica: at most `max_num_seqs` requests run and at most `max_waiting_requests` wait
behind them. Ray Serve is set to agree: `max_ongoing_requests` is that sum, so the router never sends a
replica more than it admits, and the ingress's handle holds at most `router_queue` (what all replicas admit
together) unassigned requests; beyond that a request is answered 503 with Retry-After at once. Nothing
queues unbounded.

Settings: serving/app_config.py (AppConfig); what replicas take from the cluster: serving/replicas/placement.py.
Health: Ray calls `check_health` on each replica every `health_check_period_s`; it raises when the engine
loop died or made no step for `stall_timeout_s` while it had work, and Ray replaces the replica.
Shutdown: a stopping replica takes no new requests and drains the ones in flight for up to
`graceful_shutdown_timeout_s` before its engine is shut down.

`build_app(AppConfig(...))` gives the application; `app_builder` is the entry for `serve deploy` /
`serve run serving.deployment:app_builder` (see deploy/serve_config.yaml).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from serving.api.backends import Delta, EmbeddingBackend, LLMBackend
from serving.api.context import ApiContext
from serving.api.errors import APIError, bad_request, unavailable
from serving.app_config import AppConfig
from serving.outputs import RequestOutput
from serving.replicas.placement import llm_gpus_per_rank, tensor_parallel_placement

logger = logging.getLogger(__name__)


# However busy the replica, a stream still moves at least a few times a second.
_MAX_STREAM_INTERVAL_S = 0.25


def _enter_replica(num_cpus: float) -> str:
    """Set up this Serve replica's process and return its actor name (the `replica` label everywhere).

    Torch gets as many threads as the replica's CPU share (Ray sets OMP_NUM_THREADS=1 for fractional
    shares), and our module loggers (`serving.*`) write at INFO into the replica's Serve log file through
    Serve's own handlers, which stamp each record with the replica and request ids. A server class built
    directly, outside Serve (tests), leaves the process alone and is called "local".
    """
    try:
        context = serve.get_replica_context()
    except RayServeException:
        return "local"
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))
    ours = logging.getLogger("serving")
    ours.handlers = list(logging.getLogger("ray.serve").handlers)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    return context.replica_id.to_full_id_str()


def _node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray), so /health shows where replicas are."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class LLMServer:
    """One LLM replica: an AsyncLLMEngine plus this replica's admission bound.

    Every method is `async def`: Ray Serve runs sync methods on a thread pool, and the engine must only be
    touched from its event loop's thread.
    """

    async def __init__(self, config: AppConfig):
        from serving.engine.async_engine import AsyncLLMEngine

        self.replica = _enter_replica(config.llm_num_cpus)
        self.node = _node_id()
        self.engine = AsyncLLMEngine(config.engine_config())
        await self.engine.start()
        self.capacity = config.replica_capacity
        self.stream_items_per_s = config.stream_items_per_s
        self.in_flight = 0
        logger.info("LLM replica %s serving %s (max_model_len=%d, capacity=%d)", self.replica,
                    self.engine.model_name, self.engine.max_model_len, self.capacity)

    async def model_info(self) -> dict[str, Any]:
        return {"name": self.engine.model_name, "max_model_len": self.engine.max_model_len,
                "tokenizer": self.engine.tokenizer}

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: dict[str, Any]) -> AsyncIterator[list[Delta] | APIError]:
        """Stream lists of `Delta` (new text, tokens, logprobs per completion) for one request (see
        `_coalesced`); a failure is the last item, an APIError.

        When the consumer goes away (client disconnect, cancelled handle call) the generator is closed,
        which closes the engine's stream and aborts the request: its KV blocks are freed.
        """
        from serving.engine.errors import EngineDeadError, RequestFailedError
        from serving.sampling_params import SamplingParams

        # Errors are the stream's last item, not exceptions: Ray logs an exception raised by a replica
        # method at ERROR with its traceback, which for a full queue or a bad value is noise.
        if self.in_flight >= self.capacity:
            yield unavailable(f"replica queue is full ({self.capacity} requests)", "queue_full")
            return
        self.in_flight += 1
        try:
            params = SamplingParams(**params)
            outputs = self.engine.generate(prompt_token_ids, params, request_id)
            async for deltas in _coalesced(outputs, self._stream_interval):
                yield deltas
        except EngineDeadError:
            yield unavailable("this replica's engine is down; it is being replaced", "replica_unavailable")
        except RequestFailedError as exc:
            # Not retried anywhere: on another replica the same request would fail the same way.
            yield APIError(500, str(exc), "request_failed")
        except ValueError as exc:
            yield bad_request(str(exc))
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
        from serving.engine.errors import EngineDeadError, EngineStalledError

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


async def _coalesced(outputs: AsyncIterator[RequestOutput],
                     interval_s: Callable[[], float]) -> AsyncIterator[list[Delta]]:
    """The engine's outputs for one request as `Delta`s, at most one item per `interval_s()` seconds, each
    carrying everything generated since the previous one.

    The first token leaves at once, so time to first token is untouched; later tokens that arrive within
    the interval leave together in the next item.
    """
    pending: dict[int, _Pending] = {}
    num_logprobs_sent: dict[int, int] = {}
    prompt_sent = False
    ready, done = asyncio.Event(), asyncio.Event()
    failure: list[BaseException] = []

    async def pump() -> None:
        nonlocal prompt_sent
        try:
            async for out in outputs:
                for o in out.outputs:
                    entry = pending.setdefault(o.index, _Pending())
                    entry.text += o.delta_text
                    entry.num_tokens, entry.finish_reason = len(o.token_ids), o.finish_reason
                    if o.logprobs is not None:
                        sent = num_logprobs_sent.get(o.index, 0)
                        entry.token_ids.extend(o.token_ids[sent:])
                        entry.logprobs.extend(o.logprobs[sent:])
                        num_logprobs_sent[o.index] = len(o.logprobs)
                    # Complete once the first token is sampled (the prefill is over).
                    if o.index == 0 and out.prompt_logprobs is not None and not prompt_sent and o.token_ids:
                        entry.prompt_logprobs, prompt_sent = out.prompt_logprobs, True
                ready.set()
        except Exception as exc:  # noqa: BLE001 (handed to the consumer, which raises it)
            failure.append(exc)
        finally:
            done.set()
            ready.set()

    task = asyncio.create_task(pump())
    last_sent = float("-inf")
    try:
        while True:
            await ready.wait()
            wait = last_sent + interval_s() - time.monotonic()
            if wait > 0 and not done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), wait)
            ready.clear()
            if pending:
                batch = [entry.delta(index) for index, entry in pending.items()]
                pending.clear()
                last_sent = time.monotonic()
                yield batch
            if done.is_set() and not pending:
                if failure:
                    raise failure[0]
                return
    finally:
        # Cancelling the pump closes the engine stream, which aborts the request if it is still running.
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@dataclass
class _Pending:
    """What one completion generated since its last item."""

    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None

    def delta(self, index: int) -> Delta:
        has_logprobs = bool(self.logprobs)
        return Delta(index, self.text, self.num_tokens, self.finish_reason,
                     self.token_ids if has_logprobs else None, self.logprobs if has_logprobs else None,
                     self.prompt_logprobs)


class EmbeddingServer:
    async def __init__(self, config: AppConfig):
        from serving.embeddings import EmbeddingModel, resolve_embedding_model

        self.replica = _enter_replica(config.embedding_num_cpus)
        self.model = EmbeddingModel(resolve_embedding_model(config.embedding_model, config.embedding_served_name))

    def info(self) -> dict[str, Any]:
        return {"name": self.model.name, "dimensions": self.model.dimensions,
                "max_input_tokens": self.model.max_input_tokens, "tokenizer": self.model.tokenizer}

    async def embed(self, texts: list[str]) -> tuple[Any, int] | APIError:
        """(vectors, tokens), or the APIError for bad input as a value (raised, Ray would log it at ERROR)."""
        try:
            # Off the event loop, so health checks and other calls are answered meanwhile.
            return await asyncio.to_thread(self.model.embed, texts)
        except ValueError as exc:
            return bad_request(str(exc))

    def health(self) -> dict[str, Any]:
        return {"replica": self.replica, "model": self.model.name, "healthy": True}


class Ingress:
    """The HTTP entry: builds the FastAPI app once the model deployments have described themselves."""

    async def __init__(self, config: AppConfig, llm: DeploymentHandle, embedder: DeploymentHandle | None):
        replica = _enter_replica(config.ingress_num_cpus)
        settings = config.api_settings()
        llm_backend = await LLMBackend.connect(llm, settings.retry_after_s)
        embed_backend = await EmbeddingBackend.connect(embedder, settings.retry_after_s) if embedder else None
        self.ctx = ApiContext.create(settings, llm_backend, embed_backend, replica)

    async def drain(self) -> int:
        """Refuse new requests from now on (503 + Retry-After); returns how many are still being answered."""
        self.ctx.draining = True
        return self.ctx.in_flight

    async def in_flight(self) -> int:
        return self.ctx.in_flight

    def __serve_build_asgi_app__(self) -> FastAPI:
        from serving.api.app import create_app

        return create_app(self.ctx)


# Replica code on the replica's own event loop: Ray Serve's default puts it on a thread of its own, which
# costs a cross-thread hand-off per request and per streamed item. (Routers stay on their own loop: on the
# caller's loop a burst slips past max_queued_requests.) Set per actor, so it holds on any cluster.
_REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def _actor_options(num_cpus: float, resources: dict[str, float] | None = None, **options: float) -> dict[str, Any]:
    custom = {"resources": dict(resources)} if resources else {}
    return {"num_cpus": num_cpus, **options, **custom, "runtime_env": {"env_vars": dict(_REPLICA_ENV)}}


def build_app(config: AppConfig) -> Application:
    """The application; refuses (ValueError) to build one without API keys unless insecure_no_auth is set."""
    if config.api_keys_file is None:
        if not config.insecure_no_auth:
            raise ValueError("refusing to build the serving app without authentication: set api_keys_file (create "
                             "keys with `mosaic-serve keys add NAME --api-keys-file F`) or insecure_no_auth: true")
        logger.warning("building the serving app WITHOUT authentication (insecure_no_auth)")
    elif not Path(config.api_keys_file).is_file():
        logger.error("API key file %s does not exist: every request is refused until it is created",
                     config.api_keys_file)
    gpus = llm_gpus_per_rank(config)
    llm_options: dict[str, Any] = dict(
        name="LLMServer",
        ray_actor_options=_actor_options(config.llm_num_cpus, config.llm_resources, num_gpus=gpus),
        **tensor_parallel_placement(config, gpus),
        max_ongoing_requests=config.replica_capacity,
        max_queued_requests=config.router_queue,
        health_check_period_s=config.health_check_period_s,
        health_check_timeout_s=config.health_check_timeout_s,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=1.0,
    )
    if config.autoscaling is not None:
        a = config.autoscaling
        llm_options["autoscaling_config"] = {
            "min_replicas": a.min_replicas, "initial_replicas": max(1, a.min_replicas),
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests or config.max_num_seqs,
        }
    else:
        llm_options["num_replicas"] = config.num_replicas
    llm = serve.deployment(LLMServer).options(**llm_options).bind(config)

    embedder = None
    if config.has_embeddings:
        embedder = serve.deployment(EmbeddingServer).options(
            name="EmbeddingServer",
            num_replicas=config.embedding_num_replicas,
            ray_actor_options=_actor_options(config.embedding_num_cpus),
            max_ongoing_requests=config.embedding_max_ongoing_requests,
            max_queued_requests=config.embedding_max_queued_requests,
            health_check_period_s=config.health_check_period_s,
            graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        ).bind(config)

    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name="Ingress",
        num_replicas=config.ingress_num_replicas,
        ray_actor_options=_actor_options(config.ingress_num_cpus, config.ingress_resources),
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        # The proxy's own queue in front of a saturated ingress: bounded, answered 503 + Retry-After.
        max_queued_requests=config.ingress_max_ongoing_requests,
        backpressure_config={"retry_after_s": config.retry_after_s},
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
    )
    return ingress.bind(config, llm, embedder)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for `serve run` / `serve deploy` (`import_path: serving.deployment:app_builder`)."""
    return build_app(AppConfig.model_validate(args))
