"""Regional failover in MosaicClient, in process, over two fake serving tiers (regions A then B).

Each test gets two fresh servers, so the process-wide circuit breakers (keyed by base URL) start closed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi import HTTPException

from mlflow_mosaic_provider.client import MosaicClient
from mlflow_mosaic_provider.config import MosaicConfig
from mlflow_mosaic_provider.metrics import FAILOVERS, REQUESTS
from tests.fixtures.gateway import FAKE_KEY, FAKE_KEY_VAR, free_port
from tests.gateway.fake_serving import TEXT_MODEL, FakeServing, Reply, generate

COOLDOWN_S = 0.5


@pytest.fixture
def regions(monkeypatch) -> Iterator[tuple[FakeServing, FakeServing]]:
    monkeypatch.setenv(FAKE_KEY_VAR, FAKE_KEY)
    servers = (FakeServing(FAKE_KEY), FakeServing(FAKE_KEY))
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


def client(*bases: str, **settings) -> MosaicClient:
    config = MosaicConfig(
        mosaic_api_base=list(bases), mosaic_api_key=f"${FAKE_KEY_VAR}", region_cooldown_s=COOLDOWN_S, **settings
    )
    return MosaicClient(config, endpoint="chat")


def marker() -> str:
    return f"m-{uuid.uuid4().hex[:10]}"


def completion(prompt: str, **params) -> dict:
    return {"model": TEXT_MODEL, "prompt": prompt, "max_tokens": 4, **params}


def seen(server: FakeServing, prompt: str) -> int:
    return len(server.requests_mentioning(prompt))


async def answer(c: MosaicClient, prompt: str) -> str:
    return (await c.post_json("/v1/completions", completion(prompt)))["choices"][0]["text"]


async def test_a_503_fails_over_then_the_region_is_skipped_until_its_cooldown(regions):
    a, b = regions
    c = client(a.base_url, b.base_url)
    prompt = marker()
    a.script(prompt, Reply(503, message="queue full"))
    failovers = FAILOVERS.labels("chat", a.base_url, "503")._value.get()
    assert await answer(c, prompt) == "".join(generate(prompt, 4))
    assert (seen(a, prompt), seen(b, prompt)) == (1, 1)
    assert FAILOVERS.labels("chat", a.base_url, "503")._value.get() == failovers + 1
    assert REQUESTS.labels("chat", b.base_url, "200")._value.get() == 1

    # Cooling down: A is not even tried.
    assert await answer(c, prompt) and (seen(a, prompt), seen(b, prompt)) == (1, 2)
    await asyncio.sleep(COOLDOWN_S + 0.1)
    # Probed again and healthy: back to A.
    assert await answer(c, prompt) and (seen(a, prompt), seen(b, prompt)) == (2, 2)
    assert REQUESTS.labels("chat", a.base_url, "200")._value.get() == 1


async def test_retry_after_of_a_503_sets_the_cooldown(regions):
    a, b = regions
    c = client(a.base_url, b.base_url)
    prompt = marker()
    a.script(prompt, Reply(503, retry_after="3"))
    await answer(c, prompt)
    await asyncio.sleep(COOLDOWN_S + 0.1)
    await answer(c, prompt)
    assert (seen(a, prompt), seen(b, prompt)) == (1, 2)


async def test_refused_connection_fails_over(regions):
    _, b = regions
    prompt = marker()
    assert await answer(client(f"http://127.0.0.1:{free_port()}", b.base_url), prompt)
    assert seen(b, prompt) == 1


async def test_timeout_fails_over(regions):
    a, b = regions
    prompt = marker()
    a.script(prompt, Reply(delay_s=2.0))
    started = time.monotonic()
    assert await answer(client(a.base_url, b.base_url, request_timeout_s=0.5), prompt)
    assert seen(b, prompt) == 1
    assert time.monotonic() - started < 1.8


@pytest.mark.parametrize("status", [400, 401, 404, 422, 429])
async def test_4xx_never_fails_over(regions, status):
    a, b = regions
    prompt = marker()
    a.script(prompt, *[Reply(status, message=f"said {status}")] * 4)
    with pytest.raises(HTTPException) as raised:
        await answer(client(a.base_url, b.base_url, max_retries=0), prompt)
    assert (raised.value.status_code, raised.value.detail) == (status, f"said {status}")
    assert seen(b, prompt) == 0


async def test_all_regions_down_is_the_first_regions_503(regions):
    a, b = regions
    prompt = marker()
    a.script(prompt, Reply(503, message="A is full"))
    b.script(prompt, Reply(503, message="B is full"))
    with pytest.raises(HTTPException) as raised:
        await answer(client(a.base_url, b.base_url, max_retries=0), prompt)
    assert (raised.value.status_code, raised.value.detail) == (503, "A is full")


async def test_only_one_request_probes_a_region_after_its_cooldown(regions):
    a, b = regions
    c = client(a.base_url, b.base_url)
    prompt = marker()
    a.script(prompt, Reply(503), Reply(delay_s=0.6))
    await answer(c, prompt)
    await asyncio.sleep(COOLDOWN_S + 0.1)
    probe = asyncio.create_task(answer(c, prompt))
    await asyncio.sleep(0.2)
    await answer(c, prompt)  # while the probe waits on A
    await probe
    assert (seen(a, prompt), seen(b, prompt)) == (2, 2)


async def collect(c: MosaicClient, prompt: str) -> list[str]:
    body = completion(prompt, stream=True, max_tokens=6)
    return [e["choices"][0]["text"] async for e in c.post_stream("/v1/completions", body)]


@pytest.mark.parametrize(
    "reply", [Reply(cut_after=0), Reply(error_after=0), Reply(hang_after=0)], ids=["cut", "503-event", "silent"]
)
async def test_stream_fails_over_before_its_first_chunk(regions, reply):
    a, b = regions
    prompt = marker()
    a.script(prompt, reply)
    chunks = await collect(client(a.base_url, b.base_url, stream_idle_timeout_s=0.5), prompt)
    assert chunks == generate(prompt, 6)
    assert (seen(a, prompt), seen(b, prompt)) == (1, 1)


async def test_stream_never_fails_over_after_its_first_chunk(regions):
    a, b = regions
    prompt = marker()
    a.script(prompt, Reply(cut_after=2))
    received = []
    with pytest.raises(HTTPException) as raised:
        body = completion(prompt, stream=True, max_tokens=6)
        async for event in client(a.base_url, b.base_url).post_stream("/v1/completions", body):
            received.append(event)
    assert len(received) == 2 and raised.value.status_code == 502
    assert seen(b, prompt) == 0


def test_config_takes_one_url_or_an_ordered_list():
    assert MosaicConfig(mosaic_api_base="http://a:1/").api_bases == ["http://a:1"]
    config = MosaicConfig(mosaic_api_base=["http://b:1/", "https://a:2"])
    assert config.api_bases == ["http://b:1", "https://a:2"]


@pytest.mark.parametrize(
    ("value", "message"),
    [([], "non-empty list"), (["http://a:1", "http://a:1/"], "listed twice"), (["http://a:1", "b:2"], "http://")],
)
def test_config_refuses_bad_region_lists(value, message):
    with pytest.raises(Exception, match=message):
        MosaicConfig(mosaic_api_base=value)
