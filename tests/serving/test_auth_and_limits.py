"""API keys and per-key rate limits on the live stack (keys are added to the stack's key file at run time)."""
from __future__ import annotations

import math
import time

import httpx
import pytest

from serving.api.ratelimit import seconds_until_fits
from tests.serving.helpers import scrape

CHAT = {"model": "tiny-llama-2-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _wait_for_status(base_url: str, headers: dict, status: int, timeout_s: float = 10.0) -> float:
    """Poll until /v1/models answers `status` for these headers; returns how long that took."""
    start = time.monotonic()
    while True:
        r = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10)
        if r.status_code == status:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout_s, f"still {r.status_code} after {timeout_s}s"
        time.sleep(0.2)


@pytest.mark.parametrize("headers, code", [
    ({}, "missing_api_key"),
    ({"Authorization": "Bearer"}, "missing_api_key"),
    ({"Authorization": "Bearer msk-not-a-real-key"}, "invalid_api_key"),
    ({"Authorization": "msk-not-a-real-key"}, "invalid_api_key"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid_api_key"),
])
def test_bad_keys_get_401(serving_stack, headers, code):
    for method, path, body in (("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", None),
                               ("POST", "/tiny-llama-2-chat/v1/predict", {"inputs": ["x"]})):
        r = httpx.request(method, f"{serving_stack.base_url}{path}", headers=headers, json=body, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == code


def test_refused_keys_are_counted_under_the_route(serving_stack):
    """A 401 is answered before routing; the metrics still name the route it was for."""
    def refused(endpoint: str) -> float:
        return sum(value for labels, value in scrape(serving_stack.base_url).get("mosaic_requests_total", [])
                   if labels["endpoint"] == endpoint and labels["status"] == "401")

    before = {e: refused(e) for e in ("/v1/embeddings", "/{model}/v1/predict", "unmatched")}
    for path in ("/v1/embeddings", "/all-MiniLM-L6-v2/v1/predict"):
        assert httpx.post(f"{serving_stack.base_url}{path}", json={}, timeout=30).status_code == 401
    assert refused("/v1/embeddings") == before["/v1/embeddings"] + 1
    assert refused("/{model}/v1/predict") == before["/{model}/v1/predict"] + 1
    assert refused("unmatched") == before["unmatched"]


def test_auth_comes_before_body_checks(serving_stack):
    r = httpx.post(f"{serving_stack.base_url}/v1/completions", content=b"{not json", timeout=30,
                   headers={"Authorization": "Bearer wrong", "Content-Type": "application/json"})
    assert r.status_code == 401


def test_raw_and_bearer_keys_work(serving_stack):
    for header in (serving_stack.api_key, f"Bearer {serving_stack.api_key}", f"bearer {serving_stack.api_key}"):
        r = httpx.post(f"{serving_stack.base_url}/v1/chat/completions", headers={"Authorization": header},
                       json=CHAT, timeout=60)
        assert r.status_code == 200, r.text


def test_new_and_revoked_keys_apply_without_restart(serving_stack):
    key = serving_stack.add_key("short-lived")
    headers = {"Authorization": f"Bearer {key}"}
    assert _wait_for_status(serving_stack.base_url, headers, 200) < 5
    serving_stack.revoke_key("short-lived")
    assert _wait_for_status(serving_stack.base_url, headers, 401) < 5
    # Other keys are unaffected.
    assert httpx.get(f"{serving_stack.base_url}/v1/models", headers=serving_stack.headers(), timeout=10).status_code == 200


def test_requests_per_minute_gives_429_with_retry_after(serving_stack):
    key = serving_stack.add_key("rpm-2", requests_per_minute=2)
    headers = {"Authorization": f"Bearer {key}"}
    _wait_for_status(serving_stack.base_url, headers, 200)  # /v1/models is not rate limited
    statuses = [httpx.post(f"{serving_stack.base_url}/v1/chat/completions", headers=headers, json=CHAT,
                           timeout=60) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    refused = statuses[-1]
    # Two requests fill the window; the third fits once the sliding window has dropped one: not at once.
    assert 2 <= int(refused.headers["Retry-After"]) <= 120
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and "rpm-2" in refused.json()["error"]["message"]
    # The limit is per key: the stack's main key is not affected.
    assert httpx.post(f"{serving_stack.base_url}/v1/chat/completions", headers=serving_stack.headers(), json=CHAT,
                      timeout=60).status_code == 200


def test_tokens_per_minute_counts_prompt_and_max_tokens(serving_stack):
    key = serving_stack.add_key("tpm-200", tokens_per_minute=200)
    headers = {"Authorization": f"Bearer {key}"}
    _wait_for_status(serving_stack.base_url, headers, 200)
    prompt_tokens = httpx.post(f"{serving_stack.base_url}/v1/tokenize", headers=headers, timeout=30,
                               json={"model": CHAT["model"], "messages": CHAT["messages"]}).json()["count"]
    # Reserves 100 tokens, and (ignore_eos) uses every one of them, so settling keeps the charge at 100.
    request = {**CHAT, "max_tokens": 100 - prompt_tokens, "ignore_eos": True}
    # More than the key could ever spend in a minute: 400 (no point in waiting), and it costs nothing.
    too_big = httpx.post(f"{serving_stack.base_url}/v1/chat/completions", headers=headers, timeout=60,
                         json={**CHAT, "max_tokens": 500})
    assert too_big.status_code == 400 and "200 tokens per minute" in too_big.json()["error"]["message"]
    sent, replies = [], []
    for _ in range(3):
        sent.append(time.time())
        replies.append(httpx.post(f"{serving_stack.base_url}/v1/chat/completions", headers=headers, json=request,
                                  timeout=60))
    first, second, third = replies
    assert (first.status_code, second.status_code, third.status_code) == (200, 200, 429)
    # Retry-After is when 100 more tokens fit the sliding window, computed here from the send times (the
    # server reserves within milliseconds of each): "1" would send every client back too early.
    window = int(sent[2] // 60)
    previous = 100 * sum(1 for t in sent[:2] if int(t // 60) == window - 1)
    current = 100 * sum(1 for t in sent[:2] if int(t // 60) == window)
    to_end = (window + 1) * 60 - sent[2]
    expected = seconds_until_fits(100, 60, previous, to_end if previous else 0.0, current, to_end + 60)
    assert abs(int(third.headers["Retry-After"]) - math.ceil(expected)) <= 2, (third.headers["Retry-After"], expected)



def test_requests_refused_after_reserving_give_their_tokens_back(serving_stack):
    """A request the replica refuses (before its first token) costs its request slot, not its tokens."""
    key = serving_stack.add_key("tpm-150", tokens_per_minute=150)
    headers = {"Authorization": f"Bearer {key}"}
    _wait_for_status(serving_stack.base_url, headers, 200)
    request = {"model": CHAT["model"], "prompt": [1, 2, 3, 4], "max_tokens": 96, "ignore_eos": True}
    for _ in range(2):
        # top_k beyond the vocabulary passes the door (within the table's bound) and is refused by the engine.
        bad = httpx.post(f"{serving_stack.base_url}/v1/completions", headers=headers, timeout=60,
                         json={**request, "top_k": 10**5, "temperature": 1.0})
        assert bad.status_code == 400 and "top_k" in bad.json()["error"]["message"]
    good = httpx.post(f"{serving_stack.base_url}/v1/completions", headers=headers, json=request, timeout=60)
    assert good.status_code == 200, good.text
    assert good.json()["usage"]["total_tokens"] == 100
    again = httpx.post(f"{serving_stack.base_url}/v1/completions", headers=headers, json=request, timeout=60)
    assert again.status_code == 429
