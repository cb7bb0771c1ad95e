"""Gateway-level limits: concurrency slots and the tokens-per-minute budget, in process."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import HTTPException

from mlflow_mosaic_provider.config import MosaicConfig
from mlflow_mosaic_provider.limits import EndpointLimits, endpoint_limits


async def test_concurrency_slot_is_held_for_the_block_and_freed_after():
    limits = EndpointLimits("one-slot", MosaicConfig(max_concurrent_requests=1))
    async with limits.admit():
        with pytest.raises(HTTPException) as raised:
            async with limits.admit():
                pass
        assert raised.value.status_code == 429
        assert raised.value.headers["Retry-After"] == "1"
        assert "1 concurrent" in raised.value.detail
    async with limits.admit():
        assert limits.in_flight == 1
    assert limits.in_flight == 0


async def test_slot_is_freed_when_the_request_fails():
    limits = EndpointLimits("failing", MosaicConfig(max_concurrent_requests=1))
    with pytest.raises(RuntimeError):
        async with limits.admit():
            raise RuntimeError("upstream broke")
    assert limits.in_flight == 0


async def test_concurrent_admissions_never_exceed_the_limit():
    limits = EndpointLimits("racing", MosaicConfig(max_concurrent_requests=3))
    peak = 0
    rejected = 0

    async def request() -> None:
        nonlocal peak, rejected
        try:
            async with limits.admit():
                peak = max(peak, limits.in_flight)
                await asyncio.sleep(0.05)
        except HTTPException:
            rejected += 1

    await asyncio.gather(*(request() for _ in range(10)))
    assert peak == 3
    assert rejected == 7


async def test_token_budget_is_charged_from_usage_and_then_refuses():
    limits = EndpointLimits("budget-unit", MosaicConfig(tokens_per_minute=100))
    async with limits.admit() as meter:
        meter.tokens = 60
    async with limits.admit() as meter:  # 40 left: still admitted, and may overshoot
        meter.tokens = 45
    with pytest.raises(HTTPException) as raised:
        async with limits.admit():
            pass
    assert raised.value.status_code == 429
    assert "100 tokens per minute" in raised.value.detail
    assert 1 <= int(raised.value.headers["Retry-After"]) <= 60
    assert limits.in_flight == 0


async def test_budgets_are_per_endpoint_and_shared_between_provider_instances():
    config = MosaicConfig(tokens_per_minute=10)
    first = endpoint_limits("shared-a", config)
    assert endpoint_limits("shared-a", config) is first
    assert endpoint_limits("shared-b", config) is not first
    async with first.admit() as meter:
        meter.tokens = 10
    with pytest.raises(HTTPException):
        async with endpoint_limits("shared-a", config).admit():
            pass
    async with endpoint_limits("shared-b", config).admit():
        pass
