"""No prompt or completion text (and no API key) in any file Ray or the application wrote, at any level."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx


def _files_containing(root: Path, needles: list[bytes]) -> dict[str, list[str]]:
    hits: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for needle in needles:
            if needle in data:
                hits.setdefault(needle.decode(errors="replace")[:30], []).append(str(path))
    return hits


def _wait_for_key(base: str, key: str) -> None:
    for _ in range(100):
        if httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError("the new key was not picked up")


def test_canary_appears_in_no_log(serving_stack):
    canary = f"CANARY-{uuid.uuid4().hex}"
    fake_key = f"msk-{uuid.uuid4().hex}"
    base, model, embed = serving_stack.base_url, serving_stack.model, serving_stack.embedding_model
    # A key of its own: the log lines this test looks for can only come from its own requests.
    name = f"privacy-{uuid.uuid4().hex[:12]}"
    key = serving_stack.add_key(name)
    _wait_for_key(base, key)
    completions: list[str] = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        ok = [
            ("/v1/completions", {"model": model, "prompt": f"{canary} once", "max_tokens": 40, "ignore_eos": True}),
            ("/v1/completions", {"model": model, "prompt": [canary, "x"], "max_tokens": 8, "stream": True}),
            ("/v1/chat/completions", {"model": model, "max_tokens": 40, "ignore_eos": True, "messages": [
                {"role": "system", "content": canary}, {"role": "user", "content": f"say {canary}"}]}),
            ("/v1/chat/completions", {"model": model, "max_tokens": 8, "stream": True,
                                      "messages": [{"role": "user", "content": canary}]}),
            (f"/{model}/v1/predict", {"inputs": [canary], "parameters": {"max_new_tokens": 8}}),
            (f"/{model}/v1/predict", {"inputs": [canary], "stream": True}),
            ("/v1/embeddings", {"model": embed, "input": [canary, f"{canary} two"]}),
            (f"/{embed}/v1/predict", {"inputs": [canary]}),
            ("/v1/tokenize", {"model": model, "prompt": canary}),
        ]
        for path, body in ok:
            r = client.post(path, json=body)
            assert r.status_code == 200, (path, r.text[:200])
            if path == "/v1/completions" and not body.get("stream"):
                completions.append(r.json()["choices"][0]["text"])
            if path == "/v1/chat/completions" and not body.get("stream"):
                completions.append(r.json()["choices"][0]["message"]["content"])
        refused = [
            ("/v1/completions", {"model": model, "prompt": canary, "max_tokens": canary}),
            ("/v1/completions", {"model": canary, "prompt": canary}),
            ("/v1/completions", {"model": model, "prompt": f"{canary} " * 3000, "max_tokens": 16}),
            ("/v1/chat/completions", {"model": model, "messages": [{"role": "assistant", "content": canary}]}),
            ("/v1/embeddings", {"model": embed, "input": f"{canary} " * 300}),
            (f"/{model}/v1/predict", {"inputs": [canary], "parameters": {"max_new_tokens": canary}}),
        ]
        for path, body in refused:
            assert 400 <= client.post(path, json=body).status_code < 500
        assert client.post("/v1/completions", content=f'{{"prompt": "{canary}"'.encode(),
                           headers={"Content-Type": "application/json"}).status_code == 400
    r = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {fake_key}"},
                   json={"model": model, "prompt": canary}, timeout=30)
    assert r.status_code == 401

    needles = [canary.encode(), fake_key.encode(), key.encode(), serving_stack.api_key.encode()]
    needles += [c.strip().encode() for c in completions if len(c.strip()) >= 24]
    assert len(needles) >= 5, completions  # the completions are long enough to be searched for
    logs = serving_stack.ray_temp_dir
    # This test's own access and generation lines reach the files (so the search covers what the app logs,
    # from these requests): wait for them rather than for a fixed time.
    markers = [f"/v1/chat/completions 200 key={name}".encode(), f"/v1/tokenize 200 key={name}".encode(),
               f"key={name} prompts=1 prompt_tokens=".encode(), f"embeddings key={name}".encode()]
    deadline = time.monotonic() + 60
    while len(_files_containing(logs, markers)) < len(markers):
        assert time.monotonic() < deadline, _files_containing(logs, markers)
        time.sleep(0.5)
    assert _files_containing(logs, needles) == {}
