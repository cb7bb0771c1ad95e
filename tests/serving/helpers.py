"""Small helpers shared by the serving tests (SSE parsing, metrics scraping, waiting for a condition)."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


def sse_payloads(text: str) -> list[Any]:
    """The JSON payloads of an SSE body, checking it ends with `[DONE]`."""
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", f"stream did not end with [DONE]: {events[-1:]}"
    return [json.loads(e) for e in events[:-1]]


def scrape(base_url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """/metrics as {sample name: [(labels, value)]}."""
    response = httpx.get(f"{base_url}/metrics", timeout=30)
    assert response.status_code == 200
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def per_replica(base_url: str, name: str) -> dict[str, float]:
    return {labels["replica"]: value for labels, value in scrape(base_url).get(name, [])}


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.3) -> None:
    """Poll `predicate` until it is true; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)
