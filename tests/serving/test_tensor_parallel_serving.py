"""The serving app at tensor_parallel_size=2 (a follower Ray actor in the replica's placement group):
answers chat and completions like TP=1; killing the follower fails the replica's health and Ray replaces it."""
from __future__ import annotations

import time

import httpx

from serving.app_config import AppConfig
from serving.parallel.workers import FOLLOWER_NAME_PREFIX
from tests.serving.test_lifecycle import AUX, _health, _replicas, _wait

GREEDY = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}


def _followers() -> list[dict]:
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(FOLLOWER_NAME_PREFIX)]


def test_tp2_app_answers_and_recovers_from_a_dead_follower(serving_stack):
    url = serving_stack.deploy("tp", AppConfig(api_keys_file=str(serving_stack.keys_file), tensor_parallel_size=2,
                                               **AUX))
    try:
        headers = serving_stack.headers()
        chat = {"model": serving_stack.model, "messages": [{"role": "user", "content": "Hello there"}], **GREEDY}
        completion = {"model": serving_stack.model, "prompt": "Tensor parallel", **GREEDY}
        for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
            tp2 = httpx.post(f"{url}{path}", headers=headers, json=body, timeout=120)
            tp1 = httpx.post(f"{serving_stack.base_url}{path}", headers=headers, json=body, timeout=120)
            assert tp2.status_code == tp1.status_code == 200, tp2.text
            assert tp2.json()["choices"] == tp1.json()["choices"]

        before = _replicas(url)
        import ray

        (follower,) = _followers()
        ray.kill(ray.get_actor(follower["name"], namespace=follower["namespace"]), no_restart=True)
        _wait(lambda: _health(url).status_code == 503 or not _replicas(url) & before, 60, "the replica to fail")
        _wait(lambda: _health(url).status_code == 200 and bool(_replicas(url)) and not _replicas(url) & before,
              180, "a replacement replica")
        reply = httpx.post(f"{url}/v1/completions", headers=headers, json=completion, timeout=120)
        assert reply.status_code == 200, reply.text
        _wait(lambda: len(_followers()) == 1, 30, "the dead replica's follower to go with it")
    finally:
        serving_stack.delete("tp")
        time.sleep(1)
