"""Multi-node serving on a real Ray cluster of three nodes on this machine (deploy/local_cluster.py: `ray start`
processes), deployed with `mosaic-serve --address`: replicas spread over the worker nodes that carry the
`llm_node` resource, a worker node crashes under streaming load, and the replica count recovers when a node
joins again.

The cluster is its own Ray instance in other processes (the test process holds the session's `ray.init`).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from serving.api.auth import add_key
from tests.fixtures.cluster import REPO, LocalCluster, stop_group
from tests.fixtures.gateway import free_port
from tests.serving.helpers import wait_until

STREAMERS = 3
BODY = {"model": "tiny-llama-2-chat", "prompt": "Spread over nodes", "max_tokens": 48, "ignore_eos": True,
        "stream": True}


@pytest.mark.slow
def test_replicas_spread_survive_a_node_crash_and_recover(tmp_path):
    from serving.models.tiny import resolve_model

    resolve_model("tiny-llama-2-chat")  # built once here, not by two replicas at once
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's unix socket paths
    cluster = LocalCluster(ray_tmp, env={"PYTHONPATH": str(REPO)})
    cluster.start_head(num_cpus=1, resources={"head": 1})
    server = None
    try:
        cluster.wait_for_head()
        cluster.add_worker(num_cpus=1, resources={"llm_node": 1})
        cluster.add_worker(num_cpus=1, resources={"llm_node": 1})
        keys = tmp_path / "keys.json"
        key = add_key(keys, "test")
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "--address", cluster.address, "--host", "127.0.0.1",
             "--port", str(port), "--proxy-location", "HeadOnly", "--api-keys-file", str(keys),
             "--embedding-model", "none", "--num-replicas", "2", "--num-cpus-per-replica", "1",
             "--llm-resources", json.dumps({"llm_node": 1}), "--ingress-resources", json.dumps({"head": 0.1}),
             "--max-num-seqs", "4", "--num-kv-blocks", "128", "--graceful-shutdown-timeout", "2"],
            env=cluster.env, stdout=(tmp_path / "serve.log").open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}

        def health() -> httpx.Response:
            return httpx.get(f"{base}/health", timeout=30)

        def placed() -> list[str]:
            """Nodes of the healthy LLM replicas."""
            try:
                return [r["node"] for r in health().json()["replicas"] if r.get("healthy") and r.get("node")]
            except (httpx.HTTPError, ValueError, KeyError):
                return []

        wait_until(lambda: len(placed()) == 2, 240, f"two replicas (mosaic-serve log: {tmp_path / 'serve.log'})")
        nodes = {n["id"]: n for n in cluster.nodes()}
        first = placed()
        # Spread for redundancy, and only on nodes that have the llm_node resource (never the head).
        assert len(set(first)) == 2
        assert all(nodes[n]["resources"].get("llm_node") == 1 for n in first)

        stop, stop_health = threading.Event(), threading.Event()
        outcomes: list[tuple[float, str]] = []
        health_codes: list[int] = []

        def streamer() -> None:
            with httpx.Client(timeout=120) as client:
                for _ in range(200):
                    if stop.is_set():
                        return
                    with client.stream("POST", f"{base}/v1/completions", headers=headers, json=BODY) as r:
                        if r.status_code != 200:
                            outcomes.append((time.monotonic(), f"status {r.status_code}"))
                            continue
                        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                        errored = any('"error"' in line for line in lines)
                        done = lines and lines[-1] == "data: [DONE]"
                        outcomes.append((time.monotonic(), "error-event" if errored else "ok" if done else "cut"))

        def poll_health() -> None:
            while not stop_health.is_set():
                try:
                    health_codes.append(health().status_code)
                except httpx.HTTPError:
                    health_codes.append(0)
                time.sleep(0.5)

        streamers = [threading.Thread(target=streamer) for _ in range(STREAMERS)]
        poller = threading.Thread(target=poll_health)
        for t in [*streamers, poller]:
            t.start()
        try:
            wait_until(lambda: len(outcomes) >= STREAMERS, 120, "streams before the crash")
            cluster.kill_worker(0)
            killed_at = time.monotonic()
            wait_until(lambda: sum(1 for at, o in outcomes if at > killed_at + 5 and o == "ok") >= 3, 180,
                  "streams completing on the surviving replica")
            wait_until(lambda: len(placed()) == 1, 120, "the dead node's replica to leave /health")
            stop.set()
            for t in streamers:
                t.join(timeout=150)
            # The node comes back (a new raylet with the same resources): Serve places the missing replica.
            cluster.add_worker(num_cpus=1, resources={"llm_node": 1})
            wait_until(lambda: len(set(placed())) == 2, 240, "the replica count to recover")
        finally:
            stop.set()
            stop_health.set()
            for t in [*streamers, poller]:
                t.join(timeout=150)

        counts = Counter(o for _, o in outcomes)
        # Streams on the crashed node end with an error event (or a 503 before their first token); none hang
        # or end silently, and every other outcome is a complete stream.
        assert set(counts) <= {"ok", "error-event", "status 503"}, counts
        assert counts["ok"] >= 3 + STREAMERS
        assert health_codes and all(code == 200 for code in health_codes), Counter(health_codes)
        recovered = placed()
        assert len(set(recovered)) == 2 and set(recovered) != set(first)  # one on the node that joined
    finally:
        if server is not None:
            stop_group(server)
        cluster.down()
