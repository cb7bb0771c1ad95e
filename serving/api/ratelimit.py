"""Per-key request and token rate limits, on the `limits` library (sliding-window counters).

Storage decides the scope: the default `memory://` keeps counters inside each ingress replica, so with R
ingress replicas a key can get up to R times its limit; a shared storage URI (`redis://host:6379`, or
`memcached://host:11211`; clients in the `shared-limits` extra) makes the limits cluster-wide.

Fail open: while the shared store is unreachable, requests are admitted without rate limits (keys are still
checked) and a warning is logged every 30 s; limits apply again as soon as it answers. An outage of the
counter store should not take the API down with it.

Reserve, then settle: a request first passes `precheck` (before any tokenizing: a key already out of
requests or tokens costs nothing more), then `reserve`s one request and its prompt tokens plus the most it
may generate (`max_tokens` times `n`), so it can never overdraw its budget mid-stream. When it ends,
`settle` gives back what it did not use; a request refused or failed before its first token gives back
all of its tokens and keeps only its request slot. Refunds go to the window the tokens were charged to,
in `memory://` and in Redis (`SlidingWindowRefunds`); memcached keeps the reservation as the charge. A
429's Retry-After is the time until the refused cost fits the sliding window, if nothing else is charged meanwhile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from serving.api.auth import KeyRecord
from serving.api.errors import APIError
from serving.utils.shared_limits import SlidingWindowRefunds, StoreOutage, limits_storage

_NAMESPACE = "mosaic-serve"


@dataclass
class Reservation:
    key: KeyRecord
    tokens: int
    # Where the tokens were charged: the counter's key and its window (SlidingWindowRefunds.mark).
    counter: str = ""
    window: str | int | None = None
    settled: bool = False


class RateLimiter:
    def __init__(self, storage_uri: str = "memory://"):
        self.storage_uri = storage_uri
        self._storage = limits_storage(storage_uri)
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)
        self._refunds = SlidingWindowRefunds(self._storage)
        self._outage = StoreOutage(storage_uri, "rate-limit")
        self._last_cost: dict[str, int] = {}    # key name -> tokens its last request asked for

    def _checks(self, key: KeyRecord, tokens: int) -> list[tuple[str, RateLimitItem, int]]:
        checks = []
        if key.requests_per_minute is not None:
            checks.append(("requests", RateLimitItemPerMinute(key.requests_per_minute), 1))
        if key.tokens_per_minute is not None:
            checks.append(("tokens", RateLimitItemPerMinute(key.tokens_per_minute), tokens))
        return checks

    async def precheck(self, key: KeyRecord) -> None:
        """429 at once if `key` has no request or no token left: checked before any work is done.

        The request's own cost is not known yet; its Retry-After is for the key's last token cost (clients
        tend to repeat themselves), so a client that waits as told finds room for a request like its last.
        """
        try:
            for what, item, _ in self._checks(key, 1):
                if not await self._limiter.test(item, _NAMESPACE, key.name, what, cost=1):
                    await self._refuse(key, what, item, self._last_cost.get(key.name, 1) if what == "tokens" else 1)
        except StorageError as exc:
            self._outage.report(exc)

    async def reserve(self, key: KeyRecord, tokens: int) -> Reservation:
        """Charge one request and `tokens` tokens to `key`, or raise 429 (with Retry-After) if over a limit.

        Admits the request when the storage cannot be reached (see the module docstring)."""
        if key.tokens_per_minute is not None and tokens > key.tokens_per_minute:
            raise APIError(
                400, f"this request needs {tokens} tokens (prompt plus max_tokens), more than the key's "
                f"limit of {key.tokens_per_minute} tokens per minute; lower max_tokens", "over_token_limit")
        if key.tokens_per_minute is not None:
            self._last_cost[key.name] = max(1, tokens)
        reservation = Reservation(key, 0)
        try:
            await self._reserve(reservation, tokens)
        except StorageError as exc:
            self._outage.report(exc)
        return reservation

    async def _reserve(self, reservation: Reservation, tokens: int) -> None:
        key = reservation.key
        checks = self._checks(key, tokens)
        # Test everything first so a request refused for tokens does not also spend a request slot.
        for what, item, cost in checks:
            if not await self._limiter.test(item, _NAMESPACE, key.name, what, cost=cost):
                await self._refuse(key, what, item, cost)
        for what, item, cost in checks:
            if not await self._limiter.hit(item, _NAMESPACE, key.name, what, cost=cost):
                await self.settle(reservation, 0)
                await self._refuse(key, what, item, cost)
            if what == "tokens":
                reservation.tokens = cost
                reservation.counter = item.key_for(_NAMESPACE, key.name, what)
                reservation.window = await self._refunds.mark(reservation.counter, item.get_expiry())

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Replace the reservation by what the request used (once; later calls do nothing)."""
        if reservation.settled:
            return
        reservation.settled = True
        try:
            await self._refunds.refund(reservation.counter, reservation.window,
                                       reservation.tokens - max(0, used_tokens))
        except StorageError as exc:
            self._outage.report(exc)

    async def _refuse(self, key: KeyRecord, what: str, item: RateLimitItem, cost: int) -> None:
        previous, previous_ttl, current, current_ttl = await self._storage.get_sliding_window(
            item.key_for(_NAMESPACE, key.name, what), item.get_expiry())
        wait = seconds_until_fits(item.amount - cost, item.get_expiry(), previous, previous_ttl, current,
                                  current_ttl)
        raise APIError(429, f"key {key.name!r} is over its limit of {item.amount} {what} per minute",
                       "rate_limit_exceeded", retry_after=max(1, math.ceil(wait)))


def seconds_until_fits(room: int, period: float, previous: int, previous_ttl: float, current: int,
                       current_ttl: float) -> float:
    """When the sliding-window count drops to `room`, if nothing more is charged.

    The count is previous * (share of the previous window still inside the sliding window) + current. Until
    the current window ends (in current_ttl - period seconds) the previous one fades out; after that the
    current one becomes the previous and fades out over one period.
    """
    to_rollover = max(0.0, current_ttl - period)
    if current <= room:
        if previous <= 0:
            return 0.0
        # previous * (previous_ttl - t) / period + current <= room
        return max(0.0, previous_ttl - (room - current) * period / previous)
    # After the rollover: current * (to_rollover + period - t) / period <= room
    return to_rollover + period - max(0, room) * period / current
