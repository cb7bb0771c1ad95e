"""MosaicClient against the fake serving tier, in process: retries, error mapping, SSE, connections."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import pytest
from fastapi import HTTPException

from mlflow_mosaic_provider.client import MosaicClient, close_sessions, parse_retry_after, shared_session
from mlflow_mosaic_provider.config import MosaicConfig
from tests.fixtures.gateway import FAKE_KEY, FAKE_KEY_VAR, free_port
from tests.gateway.fake_serving import TEXT_MODEL, Reply, generate


@pytest.fixture
def client_for(fake_serving, monkeypatch):
    monkeypatch.setenv(FAKE_KEY_VAR, FAKE_KEY)

    def make(**settings) -> MosaicClient:
        settings.setdefault("mosaic_api_base", fake_serving.base_url)
        return MosaicClient(MosaicConfig(mosaic_api_key=f"${FAKE_KEY_VAR}", **settings))

    return make


def marker() -> str:
    return f"m-{uuid.uuid4().hex[:10]}"


def completion(prompt: str, **params) -> dict:
    return {"model": TEXT_MODEL, "prompt": prompt, "max_tokens": 4, **params}


async def test_success_carries_usage_and_sends_the_key(client_for, fake_serving):
    prompt = marker()
    answer = await client_for().post_json("/v1/completions", completion(prompt))
    assert answer["choices"][0]["text"] == "".join(generate(prompt, 4))
    assert answer["usage"]["completion_tokens"] == 4
    (seen,) = fake_serving.requests_mentioning(prompt)
    assert seen.authorization == f"Bearer {FAKE_KEY}"


async def test_429_and_503_are_retried_honouring_retry_after(client_for, fake_serving):
    prompt = marker()
    fake_serving.script(prompt, Reply(429, retry_after="0.3"), Reply(503, retry_after="0.3"))
    started = time.monotonic()
    answer = await client_for().post_json("/v1/completions", completion(prompt))
    elapsed = time.monotonic() - started
    assert answer["choices"][0]["text"] == "".join(generate(prompt, 4))
    assert len(fake_serving.requests_mentioning(prompt)) == 3
    assert elapsed >= 0.6  # waited what the server asked for, twice


async def test_retry_after_beyond_the_budget_is_passed_on_at_once(client_for, fake_serving):
    prompt = marker()
    fake_serving.script(prompt, Reply(503, message="queue full", retry_after="30"))
    started = time.monotonic()
    with pytest.raises(HTTPException) as raised:
        await client_for(retry_budget_s=2).post_json("/v1/completions", completion(prompt))
    assert time.monotonic() - started < 1.5
    assert raised.value.status_code == 503
    assert raised.value.detail == "queue full"
    assert raised.value.headers["Retry-After"] == "30"
    assert len(fake_serving.requests_mentioning(prompt)) == 1


async def test_retries_stop_after_max_retries(client_for, fake_serving):
    prompt = marker()
    fake_serving.script(prompt, *[Reply(429, message="slow down")] * 5)
    with pytest.raises(HTTPException) as raised:
        await client_for(max_retries=2).post_json("/v1/completions", completion(prompt))
    assert raised.value.status_code == 429
    assert len(fake_serving.requests_mentioning(prompt)) == 3


@pytest.mark.parametrize(("upstream", "expected"), [(400, 400), (404, 404), (422, 422), (500, 502)])
async def test_other_errors_are_not_retried_and_keep_their_message(
    client_for, fake_serving, upstream, expected
):
    prompt = marker()
    fake_serving.script(prompt, Reply(upstream, message=f"upstream said {upstream}"))
    with pytest.raises(HTTPException) as raised:
        await client_for().post_json("/v1/completions", completion(prompt))
    assert (raised.value.status_code, raised.value.detail) == (expected, f"upstream said {upstream}")
    assert len(fake_serving.requests_mentioning(prompt)) == 1


async def test_wrong_key_is_a_401_with_the_upstream_message(fake_serving, monkeypatch):
    monkeypatch.setenv("MOSAIC_WRONG_KEY", "wrong")
    client = MosaicClient(
        MosaicConfig(mosaic_api_base=fake_serving.base_url, mosaic_api_key="$MOSAIC_WRONG_KEY")
    )
    with pytest.raises(HTTPException) as raised:
        await client.post_json("/v1/completions", completion(marker()))
    assert (raised.value.status_code, raised.value.detail) == (401, "invalid API key")


async def test_connection_refused_is_a_503_within_the_retry_budget(client_for):
    client = client_for(mosaic_api_base=f"http://127.0.0.1:{free_port()}", retry_budget_s=1.0)
    started = time.monotonic()
    with pytest.raises(HTTPException) as raised:
        await client.post_json("/v1/completions", completion("x"))
    assert time.monotonic() - started < 2.0
    assert raised.value.status_code == 503
    assert "cannot connect" in raised.value.detail
    assert raised.value.headers["Retry-After"] == "1"


async def test_reset_connections_are_retried_then_a_502(client_for, fake_serving):
    prompt = marker()
    fake_serving.script(prompt, Reply(reset=True))
    answer = await client_for().post_json("/v1/completions", completion(prompt))
    assert answer["choices"][0]["text"] == "".join(generate(prompt, 4))
    assert len(fake_serving.requests_mentioning(prompt)) == 2

    prompt = marker()
    fake_serving.script(prompt, *[Reply(reset=True)] * 3)
    with pytest.raises(HTTPException) as raised:
        await client_for(max_retries=1).post_json("/v1/completions", completion(prompt))
    assert raised.value.status_code == 502
    assert "reset the connection" in raised.value.detail
    assert len(fake_serving.requests_mentioning(prompt)) == 2


async def test_slow_answer_is_a_504(client_for, fake_serving):
    prompt = marker()
    fake_serving.script(prompt, Reply(delay_s=2.0))
    with pytest.raises(HTTPException) as raised:
        await client_for(request_timeout_s=0.5).post_json("/v1/completions", completion(prompt))
    assert raised.value.status_code == 504


def test_retry_after_parsing():
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 < parse_retry_after(in_a_minute) <= 60


# -- streams ---------------------------------------------------------------------------------------


async def collect(client: MosaicClient, body: dict) -> list[dict]:
    return [event async for event in client.post_stream("/v1/completions", body)]


async def test_stream_yields_every_chunk_in_order(client_for):
    prompt = marker()
    events = await collect(client_for(), completion(prompt, stream=True, max_tokens=6))
    assert [e["choices"][0]["text"] for e in events] == generate(prompt, 6)


async def test_stream_relays_each_event_as_it_arrives(client_for, fake_serving):
    prompt = marker()
    fake_serving.script(prompt, Reply(chunk_delay_s=0.4))
    started = time.monotonic()
    arrivals = []
    async for _ in client_for().post_stream("/v1/completions", completion(prompt, stream=True, max_tokens=3)):
        arrivals.append(time.monotonic() - started)
    assert arrivals[0] < 0.3
    assert arrivals[1] - arrivals[0] > 0.3


async def test_sse_framing_split_lines_comments_and_multiline_data(client_for, fake_serving):
    prompt = marker()
    first = json.dumps({"n": 1, "text": "a"}).encode()
    second = json.dumps({"n": 2, "text": "b"}).encode()
    fake_serving.script(
        prompt,
        Reply(
            raw=(
                b": keep-alive comment\n\nda",
                b"ta: " + first[:5],
                first[5:] + b"\r\n\r\n",
                b"event: chunk\ndata:" + second[:4] + b"\ndata:",
                second[4:] + b"\n\ndata: [DONE]\n\n",
            )
        ),
    )
    events = await collect(client_for(), completion(prompt, stream=True))
    # Per the SSE spec the two data lines of one event join with a newline, which JSON ignores.
    assert events == [{"n": 1, "text": "a"}, {"n": 2, "text": "b"}]


async def test_stream_error_before_the_first_chunk_raises_with_the_status(client_for, fake_serving):
    prompt = marker()
    fake_serving.script(prompt, Reply(422, message="max_tokens too large"))
    stream = client_for().post_stream("/v1/completions", completion(prompt, stream=True))
    with pytest.raises(HTTPException) as raised:
        await anext(stream)
    assert (raised.value.status_code, raised.value.detail) == (422, "max_tokens too large")


async def test_error_event_with_the_serving_tiers_shape_maps_its_type(client_for, fake_serving):
    prompt = marker()
    event = {"error": {"message": "engine loop died", "type": "service_unavailable", "code": "unavailable"}}
    fake_serving.script(prompt, Reply(raw=(f"data: {json.dumps(event)}\n\n".encode(),)))
    with pytest.raises(HTTPException) as raised:
        await collect(client_for(), completion(prompt, stream=True))
    assert (raised.value.status_code, raised.value.detail) == (503, "engine loop died")


@pytest.mark.parametrize(
    ("reply", "status"),
    [(Reply(error_after=2), 503), (Reply(cut_after=2), 502), (Reply(hang_after=2), 504)],
    ids=["error-event", "cut", "silent"],
)
async def test_stream_failure_after_some_chunks(client_for, fake_serving, reply, status):
    prompt = marker()
    fake_serving.script(prompt, reply)
    received = []
    with pytest.raises(HTTPException) as raised:
        async for event in client_for(stream_idle_timeout_s=0.5).post_stream(
            "/v1/completions", completion(prompt, stream=True, max_tokens=6)
        ):
            received.append(event)
    assert len(received) == 2
    assert raised.value.status_code == status


async def test_leaving_a_stream_early_drops_the_upstream_request(client_for, fake_serving):
    prompt = marker()
    fake_serving.script(prompt, Reply(chunk_delay_s=0.1))
    stream = client_for().post_stream("/v1/completions", completion(prompt, stream=True, max_tokens=50))
    await anext(stream)
    await stream.aclose()
    (seen,) = fake_serving.requests_mentioning(prompt)
    deadline = time.monotonic() + 3
    while not seen.aborted and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert seen.aborted


# -- connections -----------------------------------------------------------------------------------


async def test_one_keep_alive_connection_serves_sequential_requests(client_for, fake_serving):
    await close_sessions()
    prompts = [marker() for _ in range(5)]
    for prompt in prompts:
        # A fresh client per request, as MLflow builds a provider per request on its /v1 routes.
        await client_for().post_json("/v1/completions", completion(prompt))
    ports = {fake_serving.requests_mentioning(p)[0].peer_port for p in prompts}
    assert len(ports) == 1


async def test_sessions_are_per_loop_and_per_base_url():
    session = shared_session("http://a")
    assert shared_session("http://a") is session
    assert shared_session("http://b") is not session
    other_loop_session: list = []
    # A session is bound to its loop: another loop must get its own.
    thread = threading.Thread(target=lambda: other_loop_session.append(asyncio.run(_session_in_new_loop())))
    thread.start()
    thread.join()
    assert other_loop_session[0] is not session
    await close_sessions()
    assert session.closed
    assert shared_session("http://a") is not session


async def _session_in_new_loop():
    session = shared_session("http://a")
    await close_sessions()
    return session
