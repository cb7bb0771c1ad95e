"""Two gateway workers spend one token budget kept on a real Redis-protocol server, and fail open without it.

The workers are two `mlflow gateway start` processes (the session's fake gateway and one more with the same
endpoint), so requests can alternate between them deterministically; a worker is a process either way.
"""
from __future__ import annotations

import uuid

import requests

from tests.fixtures.gateway import (
    FAKE_KEY,
    FAKE_KEY_VAR,
    SHARED_BUDGET,
    shared_budget_endpoint,
    start_gateway,
)

# Each request below uses 1 prompt + 4 completion tokens.
TOKENS_PER_REQUEST = 5


def test_two_workers_share_one_budget_and_fail_open_without_the_store(
    fake_gateway, fake_serving, redis_server, tmp_path
):
    endpoint = shared_budget_endpoint(fake_serving.base_url, redis_server.url)
    second = start_gateway(tmp_path, [endpoint], {FAKE_KEY_VAR: FAKE_KEY})
    workers = [fake_gateway, second]
    try:

        def call(i: int) -> int:
            body = {"prompt": f"m-{uuid.uuid4().hex[:10]}", "max_tokens": 4}
            url = f"{workers[i % 2].url}/gateway/{endpoint['name']}/invocations"
            return requests.post(url, json=body, timeout=60).status_code

        admitted = SHARED_BUDGET // TOKENS_PER_REQUEST
        statuses = [call(i) for i in range(admitted + 2)]
        # The budget is spent whichever worker charged it; the next request is refused by either worker.
        # Per-worker memory:// budgets would have let every one of these through.
        assert statuses == [200] * admitted + [429, 429]

        redis_server.stop()
        try:
            # Store away: both workers keep answering (fail open) and say why.
            assert [call(i) for i in range(4)] == [200] * 4
            for worker in workers:
                assert "token budget storage redis://127.0.0.1" in worker.log()
        finally:
            redis_server.start()
    finally:
        second.stop()
