"""Serving tiers (regions) of an endpoint in their configured order, each behind a circuit breaker.

A region that failed (refused or dropped connection, timeout, 503) is *open* for a cool-down: requests go
to the regions after it, and to it only as a last resort when every other region failed too. When the
cool-down has passed, the next request probes it; that request re-arms the cool-down for everyone else
until it has an answer, so a region that is still down is probed by one request at a time. Any HTTP
answer other than a 503 shows the region is up and closes its breaker.

Breaker state is per base URL and per gateway worker process (MLflow builds a provider per request, so
it cannot live on the provider); every endpoint on the same region shares what one of them learned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

_logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Region:
    base_url: str
    open_until: float = 0.0  # time.monotonic() before which the region is skipped; 0 when closed

    def ready(self, now: float) -> bool:
        return now >= self.open_until

    def begin(self, now: float, cooldown_s: float) -> None:
        """A request is about to use the region: if this is the probe after a cool-down, hold the others."""
        if 0 < self.open_until <= now:
            self.open_until = now + cooldown_s

    def succeeded(self) -> None:
        if self.open_until:
            _logger.warning("region %s answers again; routing back to it", self.base_url)
        self.open_until = 0.0

    def failed(self, cooldown_s: float, reason: str) -> None:
        if not self.open_until:
            _logger.warning("region %s failed (%s); skipping it for %.1fs", self.base_url, reason, cooldown_s)
        self.open_until = time.monotonic() + cooldown_s


_REGIONS: dict[str, Region] = {}


def region(base_url: str) -> Region:
    """The process-wide breaker of a base URL."""
    found = _REGIONS.get(base_url)
    if found is None:
        found = _REGIONS[base_url] = Region(base_url)
    return found


class Regions:
    """The ordered regions of one endpoint."""

    def __init__(self, base_urls: Sequence[str], cooldown_s: float) -> None:
        self.regions = [region(url) for url in base_urls]
        self.cooldown_s = cooldown_s

    def order(self, avoid: Collection[Region] = ()) -> list[Region]:
        """Regions to try, best first: those not cooling down in configured order, then the cooling ones."""
        now = time.monotonic()
        candidates = [r for r in self.regions if r not in avoid]
        return sorted(candidates, key=lambda r: not r.ready(now))

    def any_besides(self, tried: Collection[Region]) -> bool:
        return any(r not in tried for r in self.regions)
