"""Replica lifecycle on a second application next to the main one: a rolling update drains the stream in
flight, and an engine that stops making progress fails its health check (/health 503) until Ray replaces it."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import httpx

from serving.app_config import AppConfig
from tests.serving.helpers import sse_payloads

AUX = dict(num_replicas=1, llm_num_cpus=0.5, max_num_seqs=4, max_waiting_requests=4, num_kv_blocks=256,
           embedding_model="none", ingress_num_cpus=0.25, health_check_period_s=1.0, health_check_timeout_s=5.0,
           graceful_shutdown_timeout_s=15.0, key_reload_interval_s=0.5)


def _health(url: str) -> httpx.Response:
    return httpx.get(f"{url}/health", timeout=30)


def _replicas(url: str) -> set[str]:
    return {r["replica"] for r in _health(url).json()["replicas"] if "replica" in r}


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_rolling_update_drains_then_stalled_engine_is_replaced(serving_stack):
    keys = str(serving_stack.keys_file)
    url = serving_stack.deploy("aux", AppConfig(api_keys_file=keys, stall_timeout_s=30.0, **AUX))
    try:
        headers = serving_stack.headers()
        before = _replicas(url)
        assert len(before) == 1 and _health(url).status_code == 200

        # A stream in flight while the application is redeployed with new settings: the old replicas stop
        # taking requests but finish this one before they go.
        result: dict = {}
        first_chunk = threading.Event()

        def stream() -> None:
            body = {"model": serving_stack.model, "prompt": "Drain me", "max_tokens": 200, "ignore_eos": True,
                    "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", headers=headers, json=body, timeout=120) as r:
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    first_chunk.set()
                result["status"], result["text"] = r.status_code, "\n".join(lines)

        consumer = threading.Thread(target=stream)
        consumer.start()
        assert first_chunk.wait(60)
        # Stalled as soon as it has work: every health check then fails. (At 1 ms, which this test used, a
        # check could fall less than 1 ms after a step's end: the tiny model's decode steps take about that, so
        # Ray's three consecutive failed checks sometimes never added up and the replica was not replaced.)
        serving_stack.deploy("aux", AppConfig(api_keys_file=keys, stall_timeout_s=1e-6, **AUX))
        consumer.join(120)
        assert result["status"] == 200
        chunks = sse_payloads(result["text"])
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        replaced = _replicas(url)
        assert replaced and not replaced & before

        # The new replica is healthy while idle, unhealthy while it has work, and Ray replaces it. Work is
        # kept coming until then: one long request can finish (on a fast engine) before Ray's consecutive
        # failed health checks add up.
        assert _health(url).status_code == 200
        replacing = threading.Event()

        def keep_busy() -> None:
            while not replacing.is_set():
                # Refused (503) or cut off while the replica is replaced: the next request follows shortly.
                with contextlib.suppress(httpx.HTTPError):
                    httpx.post(f"{url}/v1/completions", headers=headers, timeout=120,
                               json={"model": serving_stack.model, "prompt": "Busy", "max_tokens": 2000,
                                     "ignore_eos": True})
                replacing.wait(0.1)

        busy = threading.Thread(target=keep_busy)
        busy.start()
        try:
            seen: list[httpx.Response] = []
            _wait(lambda: seen.append(_health(url)) or seen[-1].status_code == 503, 30,
                  "/health to report the stall")
            unhealthy = seen[-1]
            assert int(unhealthy.headers["Retry-After"]) >= 1
            assert {r.get("error") for r in unhealthy.json()["replicas"]} & {"EngineStalledError", "RayActorError",
                                                                             "ActorDiedError"}
            _wait(lambda: bool(_replicas(url)) and not _replicas(url) & replaced, 90, "Ray to replace the replica")
        finally:
            replacing.set()
        # The deployment recovers. Not necessarily at the first look: the router may still hand the busy
        # request (if it had not started) to the replacement, which then stalls and is replaced in turn.
        _wait(lambda: _health(url).status_code == 200, 90, "a healthy replacement replica")
        busy.join(120)
    finally:
        serving_stack.delete("aux")
