"""The Ray Serve application: a FastAPI ingress, LLM replicas running the async engine, embedding replicas.

    HTTP ──► Ingress (auth, limits, tokenize, SSE) ──handles, streaming──► LLMServer × R
                                                 └──────────────────────► EmbeddingServer × E

HTTP reaches the ingress through Ray Serve's proxies, or (`build_app(config, listen=...)`, what `mosaic-serve`
does on a Ray instance of its own) each ingress replica serves the port itself: one hop less.

Backpressure, per LLM replica: at most `max_num_seqs` requests run and at most `max_waiting_requests` wait
behind them. Ray Serve is set to agree: `max_ongoing_requests` is that sum, so the router never sends a
replica more than it admits, and the ingress's handle holds at most `router_queue` (what all replicas admit
together) unassigned requests; beyond that a request is answered 503 with Retry-After at once (the ingress
also counts what it passes to the handle, as Ray's count lags a burst). Nothing queues unbounded.

Settings: serving/app_config.py (AppConfig). Replicas: serving/replicas/ (LLMServer, EmbeddingServer, what
they take from the cluster). Health: Ray calls `check_health` on each replica every `health_check_period_s`
and replaces a replica whose engine died or stalled. Shutdown: a stopping replica takes no new requests and
drains the ones in flight for up to `graceful_shutdown_timeout_s` before its engine is shut down.

`build_app(AppConfig(...))` gives the application; `app_builder` is the entry for `serve deploy` /
`serve run serving.deployment:app_builder` (see deploy/serve_config.yaml).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from serving.api.backends import EmbeddingBackend, LLMBackend
from serving.api.context import ApiContext
from serving.app_config import AppConfig
from serving.replicas.embedding_server import EmbeddingServer
from serving.replicas.llm_server import LLMServer
from serving.replicas.placement import llm_gpus_per_rank, tensor_parallel_placement
from serving.replicas.process import actor_options, enter_replica
from serving.utils.device import ALL_GPUS_VISIBLE_ENV

logger = logging.getLogger(__name__)


class LLMReplica(LLMServer):
    """What Ray Serve runs: its async constructor builds the server and starts its engine."""

    async def __init__(self, config: AppConfig):
        LLMServer.__init__(self, config)
        await self.start()


class Ingress:
    """The HTTP entry: builds the FastAPI app once the model deployments have described themselves; with
    `listen` (host, port) it also serves that app there itself (serving/api/server.py), not only behind
    Ray Serve's proxy."""

    async def __init__(self, config: AppConfig, llm: DeploymentHandle, embedder: DeploymentHandle | None,
                       listen: tuple[str, int] | None = None):
        replica = enter_replica(config.ingress_num_cpus)
        settings = config.api_settings()
        # What the LLM replicas run and queue plus what the handle queues (see AppConfig.router_queue).
        llm_backend = await LLMBackend.connect(llm, settings.retry_after_s, 2 * config.router_queue)
        embed_backend = await EmbeddingBackend.connect(embedder, settings.retry_after_s) if embedder else None
        self.ctx = ApiContext.create(settings, llm_backend, embed_backend, replica)
        self.shutdown_timeout_s = config.graceful_shutdown_timeout_s
        self.server = None
        if listen is not None:
            from serving.api.app import create_app
            from serving.api.server import DirectServer

            # What Ray's proxy bounded before (ongoing, plus as many queued) is refused 503 here instead.
            self.ctx.max_in_flight = 2 * config.ingress_max_ongoing_requests
            self.server = DirectServer(create_app(self.ctx), *listen, settings.request_read_timeout_s)

    async def drain(self) -> int:
        """Refuse new requests from now on (503 + Retry-After); returns how many are still being answered."""
        self.ctx.draining = True
        return self.ctx.in_flight

    async def in_flight(self) -> int:
        return self.ctx.in_flight

    async def __del__(self) -> None:
        # Ray counts only the requests its proxy sent: the directly served ones finish here.
        if self.server is not None:
            await self.server.stop(self.shutdown_timeout_s)

    def __serve_build_asgi_app__(self) -> FastAPI:
        from serving.api.app import create_app

        return create_app(self.ctx)


def build_app(config: AppConfig, listen: tuple[str, int] | None = None) -> Application:
    """The application; refuses (ValueError) to build one without API keys unless insecure_no_auth is set.
    `listen`: the (host, port) every ingress replica serves HTTP on itself (then start Ray Serve without
    proxies, `proxy_location="Disabled"`); None: clients go through Ray Serve's proxies."""
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
        ray_actor_options=actor_options(
            config.llm_num_cpus, config.llm_resources, num_gpus=gpus,
            env=ALL_GPUS_VISIBLE_ENV if gpus and config.tensor_parallel_size > 1 else None),
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
    llm = serve.deployment(LLMReplica).options(**llm_options).bind(config)

    embedder = None
    if config.has_embeddings:
        embedder = serve.deployment(EmbeddingServer).options(
            name="EmbeddingServer",
            num_replicas=config.embedding_num_replicas,
            ray_actor_options=actor_options(config.embedding_num_cpus),
            max_ongoing_requests=config.embedding_max_ongoing_requests,
            max_queued_requests=config.embedding_max_queued_requests,
            health_check_period_s=config.health_check_period_s,
            graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        ).bind(config)

    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name="Ingress",
        num_replicas=config.ingress_num_replicas,
        ray_actor_options=actor_options(config.ingress_num_cpus, config.ingress_resources),
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        # The proxy's own queue in front of a saturated ingress: bounded, answered 503 + Retry-After.
        max_queued_requests=config.ingress_max_ongoing_requests,
        backpressure_config={"retry_after_s": config.retry_after_s},
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
    )
    return ingress.bind(config, llm, embedder, listen)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for `serve run` / `serve deploy` (`import_path: serving.deployment:app_builder`)."""
    return build_app(AppConfig.model_validate(args))
