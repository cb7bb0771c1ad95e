"""Per-key request and token rate limits, on the `limits` library (sliding-window counters).

Storage decides the scope: the default `memory://` keeps counters inside each ingress replica, so with R
ingress replicas a key can get up to R times its limit; a shared storage URI (`redis://host:6379`, or
`memcached://host:11211`; clients in the `shared-limits` extra) makes the limits cluster-wide.

Fail open: while the shared store is unreachable, requests are admitted without rate limits (keys are still
checked) and a warning is logged every 30 s; limits apply again as soon as it answers. An outage of the
counter store should not take the API down with it.

Tokens are charged when a request is admitted, as the prompt tokens plus the most it may generate
(`max_tokens` times `n`), the way hosted LLM APIs budget: the charge is known before the work starts, and a
request can never overdraw the budget mid-stream.
"""
from __future__ import annotations

import math
import time

from limits import RateLimitItemPerMinute
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from serving.api.auth import KeyRecord
from serving.api.errors import APIError
from serving.utils.shared_limits import StoreOutage, limits_storage

_NAMESPACE = "mosaic-serve"


class RateLimiter:
    def __init__(self, storage_uri: str = "memory://"):
        self.storage_uri = storage_uri
        self._limiter = SlidingWindowCounterRateLimiter(limits_storage(storage_uri))
        self._outage = StoreOutage(storage_uri, "rate-limit")

    async def acquire(self, key: KeyRecord, tokens: int) -> None:
        """Charge one request and `tokens` tokens to `key`, or raise 429 (with Retry-After) if over a limit.

        Admits the request when the storage cannot be reached (see the module docstring)."""
        try:
            await self._acquire(key, tokens)
        except StorageError as exc:
            self._outage.report(exc)

    async def _acquire(self, key: KeyRecord, tokens: int) -> None:
        checks = []
        if key.requests_per_minute is not None:
            checks.append(("requests", RateLimitItemPerMinute(key.requests_per_minute), 1))
        if key.tokens_per_minute is not None:
            if tokens > key.tokens_per_minute:
                raise APIError(
                    400, f"this request needs {tokens} tokens (prompt plus max_tokens), more than the key's "
                    f"limit of {key.tokens_per_minute} tokens per minute; lower max_tokens", "over_token_limit")
            checks.append(("tokens", RateLimitItemPerMinute(key.tokens_per_minute), tokens))
        # Test everything first so a request refused for tokens does not also spend a request slot.
        for what, item, cost in checks:
            if not await self._limiter.test(item, _NAMESPACE, key.name, what, cost=cost):
                await self._refuse(key, what, item)
        for what, item, cost in checks:
            if not await self._limiter.hit(item, _NAMESPACE, key.name, what, cost=cost):
                await self._refuse(key, what, item)

    async def _refuse(self, key: KeyRecord, what: str, item: RateLimitItemPerMinute) -> None:
        stats = await self._limiter.get_window_stats(item, _NAMESPACE, key.name, what)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise APIError(429, f"key {key.name!r} is over its limit of {item.amount} {what} per minute",
                       "rate_limit_exceeded", retry_after=retry_after)
