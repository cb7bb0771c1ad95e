"""Two LLM replicas share the traffic; killing one under traffic costs at most retryable 503s, and Ray
brings up a replacement."""
from __future__ import annotations

import asyncio
import json
import time

import httpx

from tests.serving.helpers import per_replica, scrape

BODY = {"model": "tiny-llama-2-chat", "prompt": "Replica test", "max_tokens": 40, "ignore_eos": True}


def _wait_for_replicas(base_url: str, count: int, exclude: set[str], timeout_s: float) -> set[str]:
    start = time.monotonic()
    while True:
        health = httpx.get(f"{base_url}/health", timeout=30)
        replicas = {r["replica"] for r in health.json()["replicas"]
                    if r.get("model") == BODY["model"] and r.get("healthy")}
        if health.status_code == 200 and len(replicas) == count and not replicas & exclude:
            return replicas
        assert time.monotonic() - start < timeout_s, f"replicas after {timeout_s}s: {health.text}"
        time.sleep(0.5)


async def test_two_replicas_both_take_traffic(serving_stack):
    before = per_replica(serving_stack.base_url, "mosaic_engine_steps_total")
    assert len(before) == 2
    async with httpx.AsyncClient(base_url=serving_stack.base_url, headers=serving_stack.headers(),
                                 timeout=120) as client:
        # More at once than one replica admits (max_num_seqs + max_waiting_requests = 8).
        responses = await asyncio.gather(*(client.post("/v1/completions", json=BODY) for _ in range(16)))
    assert all(r.status_code == 200 for r in responses), [(r.status_code, r.text[:80]) for r in responses]
    after = per_replica(serving_stack.base_url, "mosaic_engine_steps_total")
    assert set(after) == set(before)
    assert all(after[r] > before[r] for r in before), (before, after, [r.status_code for r in responses])


async def _one(client: httpx.AsyncClient, stream: bool) -> tuple[int, str | None]:
    """(status, error code or None) of one request; a stream that fails after its 200 reports its error event."""
    if not stream:
        r = await client.post("/v1/completions", json=BODY)
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1
        return r.status_code, r.json()["error"]["code"] if r.status_code != 200 else None
    async with client.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.json()["error"]["code"]
        last = [line async for line in r.aiter_lines() if line.startswith("data: ")][-1]
    if last == "data: [DONE]":
        return 200, None
    error = json.loads(last[len("data: "):])["error"]
    assert error["type"] == "service_unavailable"
    return 503, error["code"]


async def test_killing_a_replica_under_traffic(serving_stack):
    """Killed while busy, with requests waiting: only the requests it had started fail (a retryable 503),
    every one still waiting is retried on the other replica before its first token and succeeds."""
    import ray

    replicas = await asyncio.to_thread(_wait_for_replicas, serving_stack.base_url, 2, set(), 60)
    victim = min(replicas)
    outcomes: list[tuple[int, str | None]] = []
    max_started = serving_stack.config.max_num_seqs  # what one replica runs at once: all it can lose

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        for round_ in range(3):
            outcomes.append(await _one(client, stream=(index + round_) % 2 == 0))

    def victim_state() -> tuple[float, float]:
        samples = scrape(serving_stack.base_url)
        values = [{labels["replica"]: v for labels, v in samples.get(name, [])}.get(victim, 0.0)
                  for name in ("mosaic_num_running_seqs", "mosaic_num_waiting_seqs")]
        return values[0], values[1]

    async with httpx.AsyncClient(base_url=serving_stack.base_url, headers=serving_stack.headers(),
                                 timeout=120) as client:
        # 12 at once: more than one replica runs, so each also queues some.
        traffic = asyncio.gather(*(client_loop(client, i) for i in range(12)))
        deadline = time.monotonic() + 60
        while True:
            running, waiting = await asyncio.to_thread(victim_state)
            if running >= 1 and waiting >= 1:
                break
            assert time.monotonic() < deadline, "the victim never had running and waiting requests"
            await asyncio.sleep(0.1)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        await traffic

        replacement = await asyncio.to_thread(_wait_for_replicas, serving_stack.base_url, 2, {victim}, 90)
        assert victim not in replacement
        # The new replica serves.
        assert (await client.post("/v1/completions", json=BODY)).status_code == 200

    assert len(outcomes) == 36
    failures = [o for o in outcomes if o[0] != 200]
    assert all(status == 503 and code == "replica_unavailable" for status, code in failures), failures
    assert len(failures) <= max_started, (len(failures), failures)
