"""Gateway-level limits per endpoint: concurrent upstream requests and a tokens-per-minute budget.

MLflow's own `limit` counts calls per client IP; these protect the serving tier per endpoint. The token
budget uses the `limits` library (fixed one-minute windows) on `limits_storage_uri`: memory:// keeps it
per worker process, redis:// or memcached:// (the `shared-limits` extra) shares one budget between all gateway
workers. Fail open: while that store is unreachable, requests go ahead without the budget and a warning is
logged every 30 s (serving/utils/shared_limits.py); the concurrency cap, in process, always holds.
Tokens are charged after the fact from the upstream `usage` (a request is admitted while the window
has budget left), so a window can overshoot by what the requests in flight use; the next requests
then wait for the window to roll over.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from limits import RateLimitItemPerMinute
from limits.aio.strategies import FixedWindowRateLimiter
from limits.errors import StorageError

from mlflow_mosaic_provider.client import LoopCache, gateway_error, loop_local
from mlflow_mosaic_provider.config import MosaicConfig
from serving.utils.shared_limits import StoreOutage, limits_storage

_NAMESPACE = "mosaic-gateway-tpm"
# A full slot frees as soon as any in-flight request ends, typically well under a second.
_CONCURRENCY_RETRY_AFTER_S = 1.0
_LIMITERS: LoopCache = LoopCache()


@dataclass
class TokenMeter:
    """What one admitted request used, filled in by the caller as the answer arrives."""

    tokens: int = 0


class EndpointLimits:
    """The limits of one endpoint, shared by every provider instance built for it in this process."""

    def __init__(self, endpoint: str, config: MosaicConfig) -> None:
        self.endpoint = endpoint
        self.max_concurrent = config.max_concurrent_requests
        self.in_flight = 0
        self._storage_uri = config.limits_storage_uri
        self._outage = StoreOutage(config.limits_storage_uri, "token budget")
        self._budget = (
            RateLimitItemPerMinute(config.tokens_per_minute, namespace=_NAMESPACE)
            if config.tokens_per_minute is not None
            else None
        )

    def _limiter(self) -> FixedWindowRateLimiter:
        # Async storages hold loop-bound resources (expiry tasks, connection pools).
        return loop_local(
            _LIMITERS,
            self._storage_uri,
            lambda: FixedWindowRateLimiter(limits_storage(self._storage_uri)),
        )

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[TokenMeter]:
        """Hold a concurrency slot for the block and charge the metered tokens when it ends.

        Raises a 429 HTTPException with Retry-After when either limit is exhausted.
        """
        # Take the slot before the first await so two requests cannot both see the last free one.
        if self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
            raise gateway_error(
                429,
                f"endpoint {self.endpoint!r} has its maximum of {self.max_concurrent} concurrent "
                "requests in flight",
                retry_after=_CONCURRENCY_RETRY_AFTER_S,
            )
        self.in_flight += 1
        meter = TokenMeter()
        try:
            if self._budget is not None:
                await self._check_budget()
            yield meter
        finally:
            self.in_flight -= 1
            if self._budget is not None and meter.tokens > 0:
                try:
                    await self._limiter().hit(self._budget, self.endpoint, cost=meter.tokens)
                except StorageError as e:
                    self._outage.report(e)

    async def _check_budget(self) -> None:
        limiter = self._limiter()
        try:
            if await limiter.test(self._budget, self.endpoint):
                return
            stats = await limiter.get_window_stats(self._budget, self.endpoint)
        except StorageError as e:
            self._outage.report(e)
            return
        raise gateway_error(
            429,
            f"endpoint {self.endpoint!r} has used its budget of {self._budget.amount} tokens per minute",
            retry_after=max(1.0, math.ceil(stats.reset_time - time.time())),
        )


_ENDPOINTS: dict[tuple[str, int | None, int | None, str], EndpointLimits] = {}


def endpoint_limits(endpoint: str, config: MosaicConfig) -> EndpointLimits:
    """The process-wide limits object of an endpoint (MLflow builds providers per request)."""
    key = (endpoint, config.max_concurrent_requests, config.tokens_per_minute, config.limits_storage_uri)
    limits = _ENDPOINTS.get(key)
    if limits is None:
        limits = _ENDPOINTS[key] = EndpointLimits(endpoint, config)
    return limits
