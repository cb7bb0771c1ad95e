"""The `limits` storages behind rate limits (ingress) and token budgets (gateway provider), and their outages.

`memory://` keeps counters in one process; `redis://host:6379` (also `rediss://`, `redis+sentinel://`,
`redis+cluster://`) and `memcached://host:11211` share them between processes and machines; their clients
come with the `shared-limits` extra. Storage errors are wrapped in `limits.errors.StorageError`, which the
callers treat as "fail open": the request goes ahead without limits while the store is unreachable (an outage
of the counter store must not take the API down), and `StoreOutage` logs that once every 30 s.
"""
from __future__ import annotations

import logging
import math
import time
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
