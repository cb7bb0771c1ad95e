"""`serve deploy` of deploy/serve_config.yaml onto a real three-node Ray cluster on this machine: the ranks
of a tensor-parallel replica are packed on one node, and a key's limit holds across two ingress replicas that share
their counters in a real Redis-protocol server (tests/fixtures/redis_server.py).

The config deployed is the shipped file with only what this machine needs changed (the tiny model, CPU ranks,
ports, this test's key file and Redis), so a field renamed in the code but not in the file fails here.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from serving.api.auth import add_key
from tests.fixtures.cluster import REPO, LocalCluster
from tests.fixtures.gateway import free_port
from tests.serving.helpers import scrape, wait_until

REQUESTS_PER_MINUTE = 5


def _serve(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("serve")), *args, "--address",
                           f"http://{cluster.address.split(':')[0]}:{cluster.dashboard_port}"],
                          env=cluster.env, capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.slow
def test_serve_deploy_packs_tensor_parallel_ranks_and_shares_limits(tmp_path, redis_server):
    from serving.models.tiny import resolve_model

    resolve_model("tiny-llama-2-chat")  # built once here, not by two ranks at once
    keys = tmp_path / "keys.json"
    key = add_key(keys, "test", requests_per_minute=REQUESTS_PER_MINUTE)
    port = free_port()
    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    config.update(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    (app,) = config["applications"]
    app["args"].update(
        model="tiny-llama-2-chat", served_model_name="tiny", tensor_parallel_size=2, llm_num_gpus=0,
        llm_num_cpus=1, llm_resources={"llm_node": 1}, num_replicas=1, max_num_seqs=4, num_kv_blocks=64,
        embedding_model="none", api_keys_file=str(keys), rate_limit_storage=redis_server.url,
        ingress_num_replicas=2, ingress_resources={"head": 0.1}, graceful_shutdown_timeout_s=2)
    config_path = tmp_path / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))

    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's unix socket paths
    cluster = LocalCluster(ray_tmp, env={"PYTHONPATH": str(REPO)})
    cluster.start_head(num_cpus=1, resources={"head": 1}, dashboard_port=free_port())
    try:
        cluster.wait_for_head()
        # Two nodes with room for both ranks each: nothing but the placement strategy keeps them together.
        cluster.add_worker(num_cpus=2, resources={"llm_node": 2})
        cluster.add_worker(num_cpus=2, resources={"llm_node": 2})
        wait_until(lambda: _serve(cluster, "status").returncode == 0, 120, "the dashboard to answer")
        deployed = _serve(cluster, "deploy", str(config_path))
        assert deployed.returncode == 0, deployed.stderr[-2000:]
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/health", timeout=10).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 300, f"the deployed app (Ray logs in {ray_tmp})", interval_s=1)

        actors: list[dict] = []
        problems: list[str] = []

        def listed() -> bool:
            """The live actors, once both ingress replicas and the follower show (the listing can lag behind
            /health, and a query can fail while the head is busy)."""
            try:
                actors[:] = cluster.actors()
            except RuntimeError as exc:
                problems[:] = [str(exc)[-500:]]
                return False
            classes = Counter(a["class"] for a in actors)
            problems[:] = [str(dict(classes))]
            return classes["ServeReplica:mosaic:Ingress"] == 2 and classes["_FollowerActor"] == 1

        try:
            wait_until(listed, 120, "the cluster's actors", interval_s=2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen: {problems}") from None
        nodes = {a["class"].rsplit(":", 1)[-1]: a["node"] for a in actors}
        assert nodes["_FollowerActor"] == nodes["LLMServer"]  # rank 1 beside rank 0

        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "tiny", "prompt": "Packed ranks", "max_tokens": 4, "temperature": 0}
        statuses = []
        for _ in range(3 * REQUESTS_PER_MINUTE):
            r = httpx.post(f"{base}/v1/completions", headers=headers, json=body, timeout=120)
            statuses.append(r.status_code)
            if r.status_code == 200:
                assert r.json()["usage"]["completion_tokens"] == 4  # answered through both ranks
            else:
                assert int(r.headers["Retry-After"]) >= 1
        assert statuses[:REQUESTS_PER_MINUTE] == [200] * REQUESTS_PER_MINUTE
        assert Counter(statuses) == {200: REQUESTS_PER_MINUTE, 429: 2 * REQUESTS_PER_MINUTE}

        # Whose counters each scrape shows: both ingress replicas answered requests of that one key.
        served: dict[str, float] = {}
        for _ in range(40):
            samples = scrape(base)
            (replica,) = [labels["replica"] for labels, _ in samples["mosaic_ingress_info"]]
            served[replica] = sum(value for labels, value in samples.get("mosaic_requests_total", [])
                                  if labels["key"] == "test")
            if len(served) == 2:
                break
        assert len(served) == 2 and all(served.values()), served
        assert sum(served.values()) == len(statuses)
    finally:
        _serve(cluster, "shutdown", "--yes")
        cluster.down()
