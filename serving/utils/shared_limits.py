"""The `limits` storages behind rate limits (ingress) and token budgets (gateway provider), and their outages.

`memory://` keeps counters in one process; `redis://host:6379` (also `rediss://`, `redis+sentinel://`,
`redis+cluster://`) and `memcached://host:11211` share them between processes and machines; their clients
come with the `shared-limits` extra. Storage errors are wrapped in `limits.errors.StorageError`, which the
callers treat as "fail open": the request goes ahead without limits while the store is unreachable (an outage
of the counter store must not take the API down), and `StoreOutage` logs that once every 30 s.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from limits.aio.storage import Storage
from limits.errors import StorageError
from limits.storage import storage_from_string

logger = logging.getLogger(__name__)

# An unreachable store costs a request at most about this long (options in the URI's query string win).
STORE_TIMEOUT_S = 1.0
_LOG_INTERVAL_S = 30.0


def limits_storage(uri: str) -> Storage:
    """The async storage of a URI (with or without the `async+` prefix); raises ConfigurationError for an
    unknown scheme or a missing client library."""
    uri = uri if uri.startswith("async+") else "async+" + uri
    options: dict = {"wrap_exceptions": True}
    if uri.startswith(("async+redis", "async+valkey")):
        # redis-py's asyncio client: limits' default for redis, coredis, conflicts with our pins.
        options.update(implementation="redispy", socket_timeout=STORE_TIMEOUT_S,
                       socket_connect_timeout=STORE_TIMEOUT_S)
    return storage_from_string(uri, **options)


class StoreOutage:
    """Reports a store that cannot be reached, at most once per interval, naming it without credentials."""

    def __init__(self, uri: str, what: str) -> None:
        parts = urlsplit(uri.removeprefix("async+"))
        self.name = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
        self.what = what
        self._logged = -math.inf

    def report(self, error: StorageError) -> None:
        now = time.monotonic()
        if now - self._logged >= _LOG_INTERVAL_S:
            self._logged = now
            logger.warning("%s storage %s unreachable (%s); admitting requests without them until it answers",
                           self.what, self.name, type(error.storage_error).__name__)


# Takes up to ARGV[1] back from the sliding-window counter that was current when the charge was made: the
# current one if it still ends at ARGV[2] (its PEXPIRETIME then), the previous one if the window has rolled
# over since (RENAME keeps the expiry). Never below zero; DECRBY keeps the key's expiry.
_REDIS_REFUND = """
for _, key in ipairs({KEYS[2], KEYS[1]}) do
    if redis.call('pexpiretime', key) == tonumber(ARGV[2]) then
        local left = tonumber(redis.call('get', key) or '0')
        local amount = math.min(left, tonumber(ARGV[1]))
        if amount > 0 then redis.call('decrby', key, amount) end
        return amount
    end
end
return 0
"""


class SlidingWindowRefunds:
    """Gives back part of a sliding-window charge, in the window it was charged to.

    `mark` (right after the charge) names that window; `refund` takes tokens back from it, and nothing once
    it has left the sliding window. In memory a window is a time bucket; in Redis (limits' layout: the current
    window `{key}`, the previous `{key}/-1`, rotated by RENAME) it is told apart by its expiry time. Other
    stores (memcached) keep the charge: `mark` returns None.
    """

    def __init__(self, storage: Storage) -> None:
        from limits.aio.storage import MemoryStorage, RedisStorage

        self._storage = storage
        self._memory = isinstance(storage, MemoryStorage)
        self._redis = isinstance(storage, RedisStorage)
        self._script = storage.bridge.get_connection().register_script(_REDIS_REFUND) if self._redis else None

    async def mark(self, key: str, expiry: int) -> str | int | None:
        if self._memory:
            return self._storage.sliding_window_keys(key, expiry, time.time())[1]
        if self._redis:
            async with self._wrapped():
                return await self._storage.bridge.get_connection().pexpiretime(self._redis_key(key))
        return None

    async def refund(self, key: str, mark: str | int | None, amount: int) -> None:
        if mark is None or amount <= 0:
            return
        if self._memory:
            await self._storage.decr(mark, amount)
        elif self._redis:
            current = self._redis_key(key)
            async with self._wrapped():
                await self._script(keys=[f"{current}/-1", current], args=[amount, mark])

    @contextlib.asynccontextmanager
    async def _wrapped(self) -> AsyncIterator[None]:
        """The store's own errors as StorageError, as limits raises them (callers fail open on it)."""
        try:
            yield
        except self._storage.base_exceptions as exc:
            raise StorageError(exc) from exc

    def _redis_key(self, key: str) -> str:
        return self._storage.bridge.prefixed_key(self._storage._current_window_key(key))
