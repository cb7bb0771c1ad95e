"""Bad input never gets a 5xx: each case gets its 4xx status and a JSON error naming the problem."""
from __future__ import annotations

import httpx
import pytest

MODEL = "tiny-llama-2-chat"
EMBED = "all-MiniLM-L6-v2"
CHAT = [{"role": "user", "content": "hi"}]

# (endpoint, JSON body, expected status, a fragment the error message must contain)
CASES = [
    # wrong types
    ("/v1/completions", {"model": MODEL, "prompt": 42}, 422, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, 422, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 422, "stream"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 422, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, 422, "content"),
    ("/v1/embeddings", {"model": EMBED, "input": [1, 2]}, 422, "input"),
    (f"/{MODEL}/v1/predict", {"inputs": "not a list"}, 422, "inputs"),
    (f"/{MODEL}/v1/predict", {"inputs": ["x"], "parameters": {"max_new_tokens": "5"}}, 422, "max_new_tokens"),
    (f"/{MODEL}/v1/predict", {"inputs": ["x"], "parameters": {"n": 2}}, 422, "parameters.n:"),
    # missing fields
    ("/v1/completions", {"prompt": "x"}, 422, "model"),
    ("/v1/completions", {"model": MODEL}, 422, "prompt"),
    ("/v1/chat/completions", {"model": MODEL}, 422, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "x"}]}, 422, "role"),
    ("/v1/embeddings", {"model": EMBED}, 422, "input"),
    (f"/{MODEL}/v1/predict", {}, 422, "inputs"),
    ("/v1/tokenize", {"model": MODEL}, 422, "exactly one"),
    # out-of-range values
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 422, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),  # 0 needs echo
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -0.5}, 422, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 422, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_k": -2}, 422, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 422, "n: Input should be greater"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 17}, 422, "n: Input should be less than or equal to 16"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": -3}, 422, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 422, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1e30}, 422, "max_tokens"),
    # bounds from serving/limits.py, at the door
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_k": 2**70, "temperature": 1}, 422, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["s"] * 17}, 422, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": "s" * 257}, 422, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 2**63}, 422, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 2.5}, 422, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT * 1025}, 422, "messages"),
    ("/v1/tokenize", {"model": MODEL, "messages": CHAT * 1025}, 422, "messages"),
    ("/v1/embeddings", {"model": EMBED, "input": [""] * 2049}, 422, "input"),
    (f"/{EMBED}/v1/predict", {"inputs": [""] * 2049}, 422, "inputs"),
    ("/v1/completions", {"model": MODEL, "prompt": ["ab" * 300_000, "ab" * 300_000]}, 422,
     "prompt: 1200000 characters"),
    # the engine's own bounds (its vocabulary), from the replica
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_k": 10**6, "temperature": 1}, 400, "top_k"),
    (f"/{MODEL}/v1/predict", {"inputs": ["x"], "parameters": {"top_p": 1.5}}, 422, "top_p"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 422, "role"),
    # semantically invalid
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "empty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens is 1000000000"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 999999], "max_tokens": 2}, 400, "999999"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "assistant", "content": "x"}]}, 400,
     "alternate"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_completion_tokens": 5000}, 400, "4096"),
    ("/v1/completions", {"model": MODEL, "prompt": ["x"] * 65}, 400, "65 prompts"),
    ("/v1/embeddings", {"model": EMBED, "input": "word " * 400}, 400, "256"),
    ("/v1/embeddings", {"model": EMBED, "input": "x", "dimensions": 3}, 400, "384"),
    (f"/{EMBED}/v1/predict", {"inputs": ["x"], "stream": True}, 400, "streamed"),
    # unknown model
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "gpt-4"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": CHAT}, 404, "gpt-4"),
    ("/v1/embeddings", {"model": MODEL, "input": "x"}, 404, "embeddings"),
    ("/no-such-model/v1/predict", {"inputs": ["x"]}, 404, "no-such-model"),
    ("/v1/tokenize", {"model": "nope", "prompt": "x"}, 404, "nope"),
]


def _check_error(r: httpx.Response, status: int, fragment: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert fragment in error["message"], error["message"]


@pytest.fixture(scope="module")
def client(serving_stack):
    with httpx.Client(base_url=serving_stack.base_url, headers=serving_stack.headers(), timeout=60) as c:
        yield c


@pytest.mark.parametrize("path, body, status, fragment", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input(client, path, body, status, fragment):
    _check_error(client.post(path, json=body), status, fragment)


@pytest.mark.parametrize("stream", [False, True])
def test_over_long_prompt_names_the_counts(client, stream):
    prompt = "hello world " * 2500
    n = client.post("/v1/tokenize", json={"model": MODEL, "prompt": prompt}).json()["count"]
    assert n > 4096
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 16, "stream": stream})
    _check_error(r, 400, f"prompt has {n} tokens and max_tokens is 16: {n + 16} exceeds the context window of 4096")
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": prompt}]})
    _check_error(r, 400, "context window of 4096 tokens")


def test_context_window_message_is_the_engines(client):
    """The ingress and the offline engine refuse an over-long prompt with the same message."""
    from serving import LLM, SamplingParams

    prompt = "hello world " * 2500
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 16})
    assert r.status_code == 400
    llm = LLM(MODEL, num_kv_blocks=8)
    with pytest.raises(ValueError) as offline:
        llm.generate([prompt], SamplingParams(max_tokens=16))
    assert str(offline.value) == r.json()["error"]["message"]


@pytest.mark.parametrize("path, body, listed, not_listed", [
    ("/v1/completions", {"model": EMBED, "prompt": "x"}, f"(text generation models: {MODEL})", "embeddings"),
    ("/v1/embeddings", {"model": MODEL, "input": "x"}, f"(embedding models: {EMBED})", "text generation"),
    ("/nope/v1/predict", {"inputs": ["x"]}, f"(text generation models: {MODEL}; embedding models: {EMBED})", None),
])
def test_unknown_model_lists_the_models_of_its_task(client, path, body, listed, not_listed):
    r = client.post(path, json=body)
    _check_error(r, 404, listed)
    message = r.json()["error"]["message"]
    if not_listed is not None:
        # The asked name is quoted at the start; the list after it names only the task's models.
        assert not_listed not in message.split("(", 1)[1]


@pytest.mark.parametrize("raw, status, fragment", [
    # A lone surrogate is valid JSON but not text: the field is named, nothing reaches a tokenizer.
    (b'{"model": "tiny-llama-2-chat", "prompt": "a\\ud800b"}', 422, "prompt"),
    (b'{"model": "tiny-llama-2-chat", "prompt": "x", "stop": ["\\udfff"]}', 422, "stop"),
    (b'{"model": "\\ud800", "prompt": "x"}', 422, "model"),
    (b'{"model": "tiny-llama-2-chat", "prompt": "x", "temperature": NaN}', 422, "temperature"),
    (b'{"model": "tiny-llama-2-chat", "prompt": "x", "top_p": Infinity}', 422, "top_p"),
    (b'{"model": "tiny-llama-2-chat", "prompt": "x",', 400, "not valid JSON"),
    (b"not json at all", 400, "not valid JSON"),
    (b"[1, 2, 3]", 422, "invalid request"),
])
def test_raw_bodies(client, raw, status, fragment):
    r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    _check_error(r, status, fragment)


def test_ten_megabyte_body_is_refused(client):
    big = b'{"model": "tiny-llama-2-chat", "prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    r = client.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"]["code"] == "request_too_large"


def test_unknown_route_and_method(client):
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.get("/v1/completions")
    _check_error(r, 405, "GET /v1/completions")
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_chunked_body_over_the_limit_is_refused(serving_stack):
    """No Content-Length: the limit is enforced while the body streams in."""
    def body():
        yield b'{"model": "tiny-llama-2-chat", "prompt": "'
        for _ in range(40):
            yield b"a" * (256 * 1024)
        yield b'"}'

    r = httpx.post(f"{serving_stack.base_url}/v1/completions", content=body(), timeout=60,
                   headers={**serving_stack.headers(), "Content-Type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
