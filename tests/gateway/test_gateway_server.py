"""The provider inside a real `mlflow gateway start` process, in front of the fake serving tier."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid

import numpy as np
import pytest
import requests
from mlflow.deployments import get_deploy_client
from openai import OpenAI

from tests.fixtures.gateway import FAKE_KEY
from tests.gateway.fake_serving import TEXT_MODEL, Reply, chat_prompt, embed, generate

TIMEOUT = 60


def marker() -> str:
    return f"m-{uuid.uuid4().hex[:10]}"


def invoke(gateway, endpoint: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(
        f"{gateway.url}/gateway/{endpoint}/invocations", json=body, timeout=TIMEOUT, **kwargs
    )


def sse_events(response: requests.Response) -> list[dict]:
    return [json.loads(line[len("data: ") :]) for line in response.iter_lines(decode_unicode=True) if line]


# -- the three routes through the deployments client -----------------------------------------------


def test_completions_through_the_deployments_client(fake_gateway, fake_serving):
    prompt = marker()
    answer = get_deploy_client(fake_gateway.url).predict(
        endpoint="completions",
        inputs={
            "prompt": prompt,
            "max_tokens": 5,
            "temperature": 0.0,
            "top_k": 3,
            "seed": 7,
            "stop": ["zulu"],
        },
    )
    assert answer["choices"][0]["text"] == "".join(generate(prompt, 5))
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
    (seen,) = fake_serving.requests_mentioning(prompt)
    assert seen.path == "/v1/completions"
    assert seen.authorization == f"Bearer {FAKE_KEY}"
    expected = {
        "model": TEXT_MODEL,
        "prompt": prompt,
        "max_tokens": 5,
        "temperature": 0.0,
        "top_k": 3,
        "seed": 7,
    }
    assert seen.body == {**expected, "stop": ["zulu"], "n": 1}


def test_chat_through_the_deployments_client(fake_gateway, fake_serving):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": marker()}]
    answer = get_deploy_client(fake_gateway.url).predict(
        endpoint="chat", inputs={"messages": messages, "max_completion_tokens": 4}
    )
    message = answer["choices"][0]["message"]
    assert (message["role"], message["content"]) == ("assistant", "".join(generate(chat_prompt(messages), 4)))
    assert answer["usage"]["completion_tokens"] == 4
    (seen,) = fake_serving.requests_mentioning(messages[1]["content"])
    assert seen.path == "/v1/chat/completions"
    assert seen.body["messages"] == messages
    assert seen.body["max_tokens"] == 4 and "max_completion_tokens" not in seen.body


def test_text_content_parts_reach_the_serving_tier(fake_gateway, fake_serving):
    word = marker()
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": word}]}
    ]
    response = invoke(fake_gateway, "chat", {"messages": messages, "max_tokens": 2})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "".join(generate(chat_prompt(messages), 2))
    (seen,) = fake_serving.requests_mentioning(word)
    assert seen.body["messages"] == messages


def test_tool_messages_are_a_422_naming_the_fields(fake_gateway):
    messages = [{"role": "user", "content": "hi", "tool_call_id": "call-1"}]
    response = invoke(fake_gateway, "chat", {"messages": messages})
    assert response.status_code == 422
    assert response.json()["detail"].endswith("messages[0].tool_call_id")


def test_embeddings_through_the_deployments_client(fake_gateway):
    texts = [marker(), marker()]
    answer = get_deploy_client(fake_gateway.url).predict(endpoint="embeddings", inputs={"input": texts})
    assert [item["embedding"] for item in answer["data"]] == [embed(t) for t in texts]
    assert answer["usage"]["prompt_tokens"] == 2


def test_openai_sdk_embeddings_in_base64(fake_gateway):
    # The OpenAI SDK asks for base64 unless told otherwise, and decodes it itself.
    text = marker()
    client = OpenAI(base_url=f"{fake_gateway.url}/v1", api_key="unused")
    vector = client.embeddings.create(model="embeddings", input=[text]).data[0].embedding
    np.testing.assert_allclose(vector, embed(text), rtol=1e-6)
    raw = invoke(fake_gateway, "embeddings", {"input": text, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, embed(text), rtol=1e-6)


def test_unsupported_parameters_are_a_422_naming_them(fake_gateway, fake_serving):
    word = marker()
    body = {
        "messages": [{"role": "user", "content": word}],
        "presence_penalty": 0.5,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "logprobs": True,
    }
    response = invoke(fake_gateway, "chat", body)
    assert response.status_code == 422
    assert response.json()["detail"] == "Unsupported parameter(s) for the mosaic provider: logprobs, tools"
    assert fake_serving.requests_mentioning(word) == []
    # The serving tier's sampling fields pass through as sent.
    fields = {"presence_penalty": 0.5, "frequency_penalty": 0.1, "logit_bias": {"1": 2.0}, "min_tokens": 1,
              "repetition_penalty": 1.1, "response_format": {"type": "json_object"}}
    passed = invoke(fake_gateway, "chat", {"messages": [{"role": "user", "content": word}], **fields})
    assert passed.status_code == 200
    [received] = fake_serving.requests_mentioning(word)
    assert {k: received.body.get(k) for k in fields} == fields


def test_image_content_is_a_422(fake_gateway):
    parts = [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]
    response = invoke(fake_gateway, "chat", {"messages": [{"role": "user", "content": parts}]})
    assert response.status_code == 422
    assert "image_url" in response.json()["detail"]


# -- streaming -------------------------------------------------------------------------------------


def test_chat_stream_through_invocations_equals_the_plain_answer(fake_gateway):
    messages = [{"role": "user", "content": marker()}]
    plain = invoke(fake_gateway, "chat", {"messages": messages, "max_tokens": 6}).json()
    with invoke(
        fake_gateway, "chat", {"messages": messages, "max_tokens": 6, "stream": True}, stream=True
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    pieces = [e["choices"][0]["delta"]["content"] for e in events]
    assert pieces == generate(chat_prompt(messages), 6)
    assert "".join(pieces) == plain["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["usage"] is None for e in events)  # not asked for, so not relayed


def test_completions_stream_through_invocations(fake_gateway):
    prompt = marker()
    with invoke(
        fake_gateway, "completions", {"prompt": prompt, "max_tokens": 5, "stream": True}, stream=True
    ) as response:
        events = sse_events(response)
    assert [e["choices"][0]["text"] for e in events] == generate(prompt, 5)


def test_chat_stream_through_the_openai_route(fake_gateway):
    messages = [{"role": "user", "content": marker()}]
    client = OpenAI(base_url=f"{fake_gateway.url}/v1", api_key="unused")
    plain = client.chat.completions.create(model="chat", messages=messages, max_tokens=6)
    stream = client.chat.completions.create(
        model="chat", messages=messages, max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices]
    assert pieces == generate(chat_prompt(messages), 6)
    assert "".join(pieces) == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_stream_chunks_leave_the_gateway_as_they_arrive(fake_gateway, fake_serving):
    prompt = marker()
    fake_serving.script(prompt, Reply(chunk_delay_s=0.5))
    started = time.monotonic()
    arrivals = []
    with invoke(
        fake_gateway, "completions", {"prompt": prompt, "max_tokens": 3, "stream": True}, stream=True
    ) as response:
        for line in response.iter_lines():
            if line:
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 3
    assert arrivals[1] - arrivals[0] > 0.35 and arrivals[2] - arrivals[1] > 0.35


def test_stream_error_before_the_first_chunk_is_an_http_error(fake_gateway, fake_serving):
    prompt = marker()
    fake_serving.script(prompt, Reply(400, message="prompt too long: 5000 tokens + 16 > 4096"))
    response = invoke(fake_gateway, "completions", {"prompt": prompt, "stream": True})
    assert response.status_code == 400
    assert response.json()["detail"] == "prompt too long: 5000 tokens + 16 > 4096"
    wrong_key = requests.post(
        f"{fake_gateway.url}/v1/chat/completions",
        json={"model": "chat-wrong-key", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        timeout=TIMEOUT,
    )
    assert wrong_key.status_code == 401


def test_stream_failure_midway_ends_with_an_error_event(fake_gateway, fake_serving):
    prompt = marker()
    fake_serving.script(prompt, Reply(cut_after=2))
    with invoke(
        fake_gateway, "completions", {"prompt": prompt, "max_tokens": 6, "stream": True}, stream=True
    ) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert [e["choices"][0]["text"] for e in events[:2]] == generate(prompt, 6)[:2]
    assert events[2]["error"]["code"] == 502
    assert len(events) == 3


def test_client_leaving_a_stream_cancels_the_upstream_request(fake_gateway, fake_serving):
    prompt = marker()
    fake_serving.script(prompt, Reply(chunk_delay_s=0.1))
    with invoke(
        fake_gateway, "completions", {"prompt": prompt, "max_tokens": 100, "stream": True}, stream=True
    ) as response:
        next(response.iter_lines())
    (seen,) = fake_serving.requests_mentioning(prompt)
    deadline = time.monotonic() + 5
    while not seen.aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen.aborted


# -- limits ----------------------------------------------------------------------------------------


def test_mlflow_limit_gives_429(fake_gateway):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    statuses = [invoke(fake_gateway, "chat-mlflow-limit", body).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_concurrency_limit_gives_429_with_retry_after(fake_gateway, fake_serving):
    holder = marker()
    fake_serving.script(holder, Reply(delay_s=2.0))
    results: dict[str, requests.Response] = {}
    first = threading.Thread(
        target=lambda: results.setdefault(
            "first",
            invoke(fake_gateway, "chat-one-at-a-time", {"messages": [{"role": "user", "content": holder}]}),
        )
    )
    first.start()
    deadline = time.monotonic() + 10
    while not fake_serving.requests_mentioning(holder) and time.monotonic() < deadline:
        time.sleep(0.02)
    second = invoke(fake_gateway, "chat-one-at-a-time", {"messages": [{"role": "user", "content": "second"}]})
    first.join()
    assert second.status_code == 429
    assert second.headers["Retry-After"] == "1"
    assert "concurrent" in second.json()["detail"]
    assert results["first"].status_code == 200
    assert (
        invoke(
            fake_gateway, "chat-one-at-a-time", {"messages": [{"role": "user", "content": "after"}]}
        ).status_code
        == 200
    )


def test_token_budget_gives_429_with_retry_after(fake_gateway):
    # The budget is 40 tokens a minute; each request uses 1 prompt + 30 completion tokens.
    body = {"prompt": marker(), "max_tokens": 30}
    assert invoke(fake_gateway, "completions-budget", body).status_code == 200
    assert invoke(fake_gateway, "completions-budget", body).status_code == 200
    refused = invoke(fake_gateway, "completions-budget", body)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "40 tokens per minute" in refused.json()["detail"]


# -- upstream failures -----------------------------------------------------------------------------


def test_serving_down_gives_503(fake_gateway):
    response = invoke(fake_gateway, "chat-down", {"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503
    assert "cannot connect" in response.json()["detail"]
    assert response.headers["Retry-After"] == "1"


def test_wrong_key_gives_the_upstream_401(fake_gateway):
    response = invoke(fake_gateway, "chat-wrong-key", {"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 401
    assert response.json()["detail"] == "invalid API key"


def test_upstream_429_is_retried_transparently(fake_gateway, fake_serving):
    prompt = marker()
    fake_serving.script(prompt, Reply(429, retry_after="0"), Reply(503, retry_after="0"))
    response = invoke(fake_gateway, "completions", {"prompt": prompt, "max_tokens": 2})
    assert response.status_code == 200
    assert len(fake_serving.requests_mentioning(prompt)) == 3


def test_upstream_503_beyond_the_retry_budget_is_passed_on(fake_gateway, fake_serving):
    word = marker()
    fake_serving.script(word, Reply(503, message="queue full", retry_after="30"))
    started = time.monotonic()
    response = invoke(fake_gateway, "chat-impatient", {"messages": [{"role": "user", "content": word}]})
    assert time.monotonic() - started < 3
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "30"
    assert response.json()["detail"] == "queue full"


def test_slow_upstream_gives_504(fake_gateway, fake_serving):
    word = marker()
    fake_serving.script(word, Reply(delay_s=3.0))
    response = invoke(fake_gateway, "chat-slow", {"messages": [{"role": "user", "content": word}]})
    assert response.status_code == 504
    silent = marker()
    fake_serving.script(silent, Reply(hang_after=0))
    stream = invoke(
        fake_gateway, "chat-slow", {"messages": [{"role": "user", "content": silent}], "stream": True}
    )
    assert stream.status_code == 504


# -- connections and privacy -----------------------------------------------------------------------


def test_sequential_requests_share_one_upstream_connection(fake_gateway, fake_serving):
    words = [marker() for _ in range(6)]
    for i, word in enumerate(words):
        if i % 2:
            # MLflow's /v1 route builds a new provider for every request.
            requests.post(
                f"{fake_gateway.url}/v1/chat/completions",
                json={"model": "chat", "messages": [{"role": "user", "content": word}]},
                timeout=TIMEOUT,
            ).raise_for_status()
        else:
            invoke(fake_gateway, "chat", {"messages": [{"role": "user", "content": word}]}).raise_for_status()
    ports = {fake_serving.requests_mentioning(w)[0].peer_port for w in words}
    assert len(ports) == 1


def test_gateway_log_holds_neither_key_nor_prompt(fake_gateway):
    canary = f"canary-{uuid.uuid4().hex}"
    invoke(fake_gateway, "chat", {"messages": [{"role": "user", "content": canary}]}).raise_for_status()
    invoke(fake_gateway, "chat-down", {"messages": [{"role": "user", "content": canary}]})
    log = fake_gateway.log()
    assert "Application startup complete" in log
    assert FAKE_KEY not in log
    assert canary not in log


@pytest.mark.parametrize("route", ["/gateway/chat/invocations", "/endpoints/chat/invocations"])
def test_both_invocation_routes_serve_the_endpoint(fake_gateway, route):
    response = requests.post(
        fake_gateway.url + route,
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    assert response.json()["provider"] == "mosaic"
