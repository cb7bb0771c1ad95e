"""Per-key limits on a real Redis-protocol server (tests/fixtures/redis_server.py): one budget for every
ingress replica, and fail open while the store is away."""
from __future__ import annotations

import logging
import uuid

import pytest
import redis

from serving.api.auth import KeyRecord
from serving.api.errors import APIError
from serving.api.ratelimit import RateLimiter
from serving.utils.shared_limits import StoreOutage


def key(**limits) -> KeyRecord:
    return KeyRecord(name=f"k-{uuid.uuid4().hex[:8]}", sha256="", **limits)


async def test_one_budget_across_two_ingress_replicas(redis_server):
    # Each ingress replica builds its own limiter from the same storage URI.
    replicas = [RateLimiter(redis_server.url), RateLimiter(redis_server.url)]
    alice = key(requests_per_minute=5)
    for i in range(5):
        await replicas[i % 2].reserve(alice, 1)
    for replica in replicas:  # the 6th is refused whichever replica serves it
        with pytest.raises(APIError) as refused:
            await replica.reserve(alice, 1)
        assert refused.value.status == 429 and refused.value.retry_after >= 1

    bob = key(tokens_per_minute=100)
    await replicas[0].reserve(bob, 60)
    with pytest.raises(APIError, match="over its limit of 100 tokens"):
        await replicas[1].reserve(bob, 41)
    await replicas[1].reserve(bob, 40)

    # Per replica in memory, the same key gets twice its limit: what the shared store prevents.
    local = [RateLimiter("memory://"), RateLimiter("memory://")]
    carol = key(requests_per_minute=5)
    for i in range(10):
        await local[i % 2].reserve(carol, 1)


async def test_fails_open_while_the_store_is_away_then_limits_again(redis_server, caplog):
    limiter = RateLimiter(redis_server.url)
    dave = key(requests_per_minute=2)
    await limiter.reserve(dave, 1)
    await limiter.reserve(dave, 1)
    with pytest.raises(APIError):
        await limiter.reserve(dave, 1)
    redis_server.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="serving.utils.shared_limits"):
            for _ in range(3):
                await limiter.reserve(dave, 1)  # admitted: no store, no limits
        (warning,) = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
        assert f"redis://127.0.0.1:{redis_server.port}" in warning
    finally:
        redis_server.start()
    # Back: the counters were lost with the store (no persistence), so limits start afresh.
    await limiter.reserve(dave, 1)
    await limiter.reserve(dave, 1)
    with pytest.raises(APIError):
        await limiter.reserve(dave, 1)


def test_store_is_named_without_credentials():
    assert StoreOutage("async+redis://user:secret-pw@cache.internal:6380/0", "x").name == "redis://cache.internal:6380"


async def test_unused_tokens_go_back_to_the_shared_window_they_were_charged_to(redis_server):
    replicas = [RateLimiter(redis_server.url), RateLimiter(redis_server.url)]
    erin = key(tokens_per_minute=100)
    first = await replicas[0].reserve(erin, 100)
    with pytest.raises(APIError, match="tokens per minute"):
        await replicas[1].reserve(erin, 50)
    await replicas[0].settle(first, 30)          # used 30 of the 100 reserved
    await replicas[0].settle(first, 0)           # settling twice changes nothing
    second = await replicas[1].reserve(erin, 70)  # the 70 given back are there for the other replica too
    with pytest.raises(APIError, match="tokens per minute"):
        await replicas[0].reserve(erin, 1)

    # The window rolls over (limits renames the current counter to the previous one): the refund follows it.
    client = redis.Redis(port=redis_server.port)
    (current,) = [k for k in client.keys("*") if erin.name.encode() in k and k.endswith(b"}")]
    client.rename(current, current + b"/-1")
    await replicas[1].settle(second, 0)
    assert int(client.get(current + b"/-1")) == 30
    assert client.get(current) is None            # nothing credited to a window it was never charged to
