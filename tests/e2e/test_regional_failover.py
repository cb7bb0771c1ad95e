"""Two real serving tiers behind a real `mlflow gateway start`: region A is taken off the network under load.

Region A is its own Ray Serve application (own LLM replica and ingress) on the session's Ray instance,
reached through a TCP edge on its own port (tests/fixtures/edge.py); region B is the session's main
application on the Serve proxy's port. Stopping A's edge refuses new connections and cuts every open one,
as a region outage does. Non-streaming requests must all succeed; streams may end with an error event only
when A was cut after their first chunk. When A comes back, traffic returns to it after its cool-down.
"""
from __future__ import annotations

import json
import threading
from collections import Counter
from urllib.parse import urlsplit

import pytest
import requests

from serving.app_config import AppConfig
from tests.fixtures.edge import Edge
from tests.fixtures.gateway import free_port, mosaic_endpoint, provider_metrics
from tests.serving.helpers import wait_until

REGION = dict(num_replicas=1, llm_num_cpus=0.5, max_num_seqs=4, max_waiting_requests=8, num_kv_blocks=256,
              embedding_model="none", ingress_num_cpus=0.25, health_check_period_s=2.0, graceful_shutdown_timeout_s=5.0,
              key_reload_interval_s=0.5)
COOLDOWN_S = 2.0
CLIENTS, STREAMERS = 4, 2
BODY = {"messages": [{"role": "user", "content": "Tell me about regions"}], "max_tokens": 8, "temperature": 0.0}
MAX_REQUESTS_PER_CLIENT = 40


def served_by(metrics_url: str) -> Counter:
    return Counter(provider_metrics(metrics_url)[0])


def failovers(metrics_url: str) -> float:
    return provider_metrics(metrics_url)[1]


@pytest.mark.slow
def test_a_region_stopped_under_load_fails_no_request_and_traffic_returns(serving_stack, gateway_launcher):
    region_url = serving_stack.deploy("region-a", AppConfig(api_keys_file=str(serving_stack.keys_file), **REGION))
    # Region A is an extra application: behind Ray Serve's proxy, whose port the edge forwards to.
    edge = Edge(urlsplit(region_url).port)
    edge.start()
    try:
        region_a, region_b = f"{edge.url}/region-a", serving_stack.base_url.rstrip("/")
        metrics_port = free_port()
        endpoint = mosaic_endpoint("chat-two-regions", "llm/v1/chat", serving_stack.model, [region_a, region_b],
                                   "$MOSAIC_API_KEY", region_cooldown_s=COOLDOWN_S, max_retries=0)
        gateway = gateway_launcher([endpoint], {"MOSAIC_API_KEY": serving_stack.api_key,
                                                "MOSAIC_GATEWAY_METRICS_PORT": str(metrics_port)})
        url = f"{gateway.url}/gateway/chat-two-regions/invocations"
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        assert requests.post(url, json=BODY, timeout=120).status_code == 200
        assert served_by(metrics)[region_a] == 1  # the first region serves while it is up

        stop = threading.Event()
        statuses: list[int] = []
        streams: list[str] = []  # "ok", "error-event" or "status <n>"

        def client() -> None:
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if stop.is_set():
                    return
                statuses.append(requests.post(url, json=BODY, timeout=120).status_code)

        def streamer() -> None:
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if stop.is_set():
                    return
                with requests.post(url, json={**BODY, "stream": True}, stream=True, timeout=120) as r:
                    if r.status_code != 200:
                        streams.append(f"status {r.status_code}")
                        continue
                    events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line]
                    streams.append("error-event" if any("error" in e for e in events) else "ok")

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        threads += [threading.Thread(target=streamer) for _ in range(STREAMERS)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: served_by(metrics)[region_a] >= 5, 90, "load on region A")
            edge.stop()  # region A goes away with requests in flight
            done_at_stop = len(statuses)
            wait_until(lambda: len(statuses) >= done_at_stop + 8, 90, "requests after the outage")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=150)

        assert statuses and all(s == 200 for s in statuses), Counter(statuses)
        assert all(s in ("ok", "error-event") for s in streams), Counter(streams)
        # Only streams already past their first chunk on A when it was cut may end with an error event.
        assert streams.count("error-event") <= STREAMERS, Counter(streams)
        assert failovers(metrics) >= 1
        assert served_by(metrics)[region_b] >= 8

        # A is back: after its cool-down a request probes it and traffic routes back.
        edge.start()
        before = served_by(metrics)[region_a]
        wait_until(lambda: requests.post(url, json=BODY, timeout=120).status_code == 200
              and served_by(metrics)[region_a] > before, COOLDOWN_S + 30, "traffic to return to region A")
        assert "routing back" in gateway.log()
        assert serving_stack.api_key not in gateway.log()
    finally:
        edge.close()
        serving_stack.delete("region-a")
