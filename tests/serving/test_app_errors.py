"""The ingress app's own answers, in process (no Ray, no model): Starlette's 4xx in the one JSON shape, and
requests answered before routing counted under their route in the metrics."""
from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.api.app import create_app
from serving.api.auth import add_key
from serving.api.context import ApiContext, ApiSettings


@pytest.fixture()
def app_and_key(tmp_path):
    keys = tmp_path / "keys.json"
    key = add_key(keys, "alice")
    return create_app(ApiContext.create(ApiSettings(api_keys_file=str(keys)), None, None)), key


async def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress")


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code"}
    return error


async def test_wrong_method_and_unknown_route_are_invalid_requests(app_and_key):
    app, key = app_and_key
    async with await _client(app) as client:
        r = await client.get("/v1/completions", headers={"Authorization": key})
        error = _error(r, 405)
        assert (error["type"], error["code"]) == ("invalid_request_error", "method_not_allowed")
        assert "GET /v1/completions" in error["message"] and "POST" in error["message"]
        assert r.headers["allow"] == "POST"
        error = _error(await client.get("/v1/nothing-here", headers={"Authorization": key}), 404)
        assert (error["type"], error["code"]) == ("invalid_request_error", "unknown_route")
        assert "/v1/nothing-here" in error["message"]


async def test_refused_keys_are_counted_under_the_route(app_and_key):
    app, key = app_and_key
    async with await _client(app) as client:
        assert (await client.post("/v1/completions", json={})).status_code == 401
        assert (await client.post("/tiny/v1/predict", json={}, headers={"Authorization": "wrong"})).status_code == 401
        assert (await client.get("/v1/nothing-here", headers={"Authorization": key})).status_code == 404
        text = (await client.get("/metrics")).text
    counted = {(s.labels["endpoint"], s.labels["status"]): s.value
               for family in text_string_to_metric_families(text) if family.name == "mosaic_requests"
               for s in family.samples if s.name == "mosaic_requests_total"}
    assert counted[("/v1/completions", "401")] == 1
    assert counted[("/{model}/v1/predict", "401")] == 1
    # A path no route has stays one bounded label.
    assert counted[("unmatched", "404")] == 1
    assert ("unmatched", "401") not in counted


async def test_a_full_ingress_refuses_with_retry_after_but_answers_health(tmp_path):
    keys = tmp_path / "keys.json"
    key = add_key(keys, "alice")
    ctx = ApiContext.create(ApiSettings(api_keys_file=str(keys)), None, None)
    app = create_app(ctx)
    ctx.max_in_flight, ctx.in_flight = 1, 1  # one request already being answered
    async with await _client(app) as client:
        r = await client.post("/v1/completions", json={}, headers={"Authorization": key})
        assert _error(r, 503)["code"] == "ingress_busy"
        assert int(r.headers["Retry-After"]) >= 1
        assert (await client.get("/health")).status_code == 200
        ctx.in_flight = 0
        assert (await client.post("/v1/completions", json={}, headers={"Authorization": key})).status_code == 422
