"""Schema-driven fuzzing of every endpoint, from the app's own OpenAPI schema (schemathesis), against the
session's serving stack: whatever comes in, the answer is never a 5xx other than a 503 with Retry-After,
and the stack still serves afterwards. Fixed seed, bounded examples."""
from __future__ import annotations

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings

from serving.api.app import create_app
from serving.api.context import ApiContext
from serving.api.metrics import Metrics
from serving.api.ratelimit import RateLimiter
from serving.config import ApiSettings


def _schema() -> dict:
    ctx = ApiContext(ApiSettings(), None, RateLimiter(), Metrics(), None, None)
    return create_app(ctx).openapi()


SCHEMA = schemathesis.openapi.from_dict(_schema())


@pytest.fixture(scope="module", autouse=True)
def _ieee_subnormals() -> None:
    """In-process engine tests turn on torch's process-wide flush-denormal (ModelRunner on CPU), and hypothesis
    refuses to generate floats while subnormals are flushed. The stack's replicas are other processes; an
    in-process engine made later switches it on again itself."""
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def fuzz_headers(serving_stack) -> dict[str, str]:
    # A token budget keeps whatever valid generations the fuzzer finds short (the rest get 400/429).
    key = serving_stack.add_key("fuzz", tokens_per_minute=1500)
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(50):
        if httpx.get(f"{serving_stack.base_url}/v1/models", headers=headers, timeout=10).status_code == 200:
            return headers
    pytest.fail("the fuzz key was not picked up")


@pytest.mark.slow
@SCHEMA.parametrize()
@settings(max_examples=30, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_no_endpoint_answers_5xx(case, serving_stack, fuzz_headers):
    response = case.call(base_url=serving_stack.base_url, headers=fuzz_headers, timeout=120)
    status = response.status_code
    assert status < 500 or (status == 503 and "Retry-After" in response.headers), (
        case.method, case.path, status, response.text[:300])


@pytest.mark.slow
def test_still_serving_after_the_fuzzing(serving_stack):
    health = httpx.get(f"{serving_stack.base_url}/health", timeout=30)
    assert health.status_code == 200 and all(r["healthy"] for r in health.json()["replicas"])
    r = httpx.post(f"{serving_stack.base_url}/v1/completions", headers=serving_stack.headers(), timeout=60,
                   json={"model": serving_stack.model, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
