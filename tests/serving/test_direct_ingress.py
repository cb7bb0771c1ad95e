"""Ingress replicas that serve HTTP themselves (`build_app(config, listen=...)`, what `mosaic-serve` runs on
its own Ray instance), on the session's Ray Serve: two replicas share the port and both answer, keys are
checked and streams end whole, a killed ingress replica is replaced and binds the port again, and deleting
the application frees the port."""
from __future__ import annotations

import re
import socket

import httpx

from serving.app_config import AppConfig
from serving.deployment import build_app
from tests.fixtures.gateway import free_port
from tests.serving.helpers import sse_payloads, wait_until

DIRECT = {"num_replicas": 1, "llm_num_cpus": 0.5, "max_num_seqs": 4, "max_waiting_requests": 4,
          "num_kv_blocks": 256, "embedding_model": "none", "ingress_num_replicas": 2, "ingress_num_cpus": 0.25,
          "graceful_shutdown_timeout_s": 5.0}


def _answering(url: str) -> str | None:
    """The ingress replica that answered a scrape on a fresh connection; None for a connection the kernel
    had queued on a replica's socket as it was killed (reset)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.TransportError:
        return None
    return re.search(r'mosaic_ingress_info\{replica="([^"]+)"\}', text).group(1)


def _seen(url: str, tries: int = 64) -> set[str | None]:
    return {_answering(url) for _ in range(tries)}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_ingress_replicas_share_the_port_and_a_killed_one_is_replaced(serving_stack):
    import ray
    from ray import serve

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = AppConfig(api_keys_file=str(serving_stack.keys_file), **DIRECT)
    serve.run(build_app(config, listen=("127.0.0.1", port)), name="direct", route_prefix="/direct")
    try:
        assert httpx.post(f"{url}/v1/completions", json={}, timeout=30).status_code == 401
        body = {"model": serving_stack.model, "prompt": "Direct", "max_tokens": 8, "ignore_eos": True, "stream": True}
        r = httpx.post(f"{url}/v1/completions", json=body, headers=serving_stack.headers(), timeout=60)
        assert r.status_code == 200
        assert sse_payloads(r.text)[-1]["choices"][0]["finish_reason"] == "length"

        before = _seen(url)
        assert len(before) == 2
        victim = min(before)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        wait_until(lambda: len(_seen(url, 16) - before - {None}) == 1, 90, "a replacement ingress replica")
        after = _seen(url)  # every fresh connection answered (no None), by the survivor or the replacement
        assert victim not in after and None not in after and len(after) == 2
    finally:
        serve.delete("direct")
    wait_until(lambda: _port_free(port), 30, "the port to be released")
