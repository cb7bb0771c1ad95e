from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mlflow_mosaic_provider.client import close_sessions


@pytest.fixture(autouse=True)
async def _close_shared_sessions() -> AsyncIterator[None]:
    """Close the provider's shared aiohttp sessions after each test.

    The in-process tests here (MosaicClient against fake serving tiers) run on pytest-asyncio's
    session-wide loop, and the client keeps one keep-alive session per loop and base URL in a
    module-level cache. Every test_failover test starts two servers on new ports, so each one left
    two more open sessions behind. Nothing closed them, so at interpreter exit aiohttp printed
    "Unclosed client session" for each one. The gateway process is fine: it keeps its sessions
    for the worker's lifetime.
    """
    yield
    await close_sessions()
