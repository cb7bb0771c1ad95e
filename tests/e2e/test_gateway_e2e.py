"""End to end: a real `mlflow gateway start` in front of the real serving app (Ray Serve, tiny model).

Every answer through the gateway is compared with the serving API's own answer to the same greedy
request, so the tests hold whatever the tiny model happens to say.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import requests
from mlflow.deployments import get_deploy_client
from openai import OpenAI

TIMEOUT = 120
GREEDY = {"temperature": 0.0, "seed": 0}


def direct(stack, path: str, body: dict) -> dict:
    response = requests.post(
        f"{stack.base_url.rstrip('/')}{path}",
        json=body,
        headers={"Authorization": f"Bearer {stack.api_key}"},
        timeout=TIMEOUT,
    )
    response.raise_for_status()
    return response.json()


def invoke(gateway, endpoint: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(
        f"{gateway.url}/gateway/{endpoint}/invocations", json=body, timeout=TIMEOUT, **kwargs
    )


def sse_events(response: requests.Response) -> list[dict]:
    return [json.loads(line[len("data: ") :]) for line in response.iter_lines(decode_unicode=True) if line]


MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three colours."},
]


def test_completions_match_the_serving_api(e2e_gateway, serving_stack):
    params = {"prompt": "The capital of France is", "max_tokens": 8, **GREEDY}
    through = get_deploy_client(e2e_gateway.url).predict(endpoint="llama2-completions", inputs=params)
    straight = direct(serving_stack, "/v1/completions", {"model": serving_stack.model, **params})
    assert through["choices"][0]["text"] == straight["choices"][0]["text"]
    assert through["choices"][0]["finish_reason"] == straight["choices"][0]["finish_reason"]
    assert through["usage"] == straight["usage"]


def test_chat_matches_the_serving_api(e2e_gateway, serving_stack):
    params = {"messages": MESSAGES, "max_tokens": 8, **GREEDY}
    through = get_deploy_client(e2e_gateway.url).predict(endpoint="llama2-chat", inputs=params)
    straight = direct(serving_stack, "/v1/chat/completions", {"model": serving_stack.model, **params})
    assert through["choices"][0]["message"]["content"] == straight["choices"][0]["message"]["content"]
    assert through["usage"] == straight["usage"]
    assert through["usage"]["completion_tokens"] >= 1


def test_structured_output_and_penalties_pass_through_the_gateway(e2e_gateway, serving_stack):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    params = {"messages": MESSAGES, "max_tokens": 24, "presence_penalty": 0.5, "repetition_penalty": 1.2,
              "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}, **GREEDY}
    through = get_deploy_client(e2e_gateway.url).predict(endpoint="llama2-chat", inputs=params)
    straight = direct(serving_stack, "/v1/chat/completions", {"model": serving_stack.model, **params})
    content = through["choices"][0]["message"]["content"]
    assert content == straight["choices"][0]["message"]["content"]
    assert json.loads(content)["colour"] in ("red", "green", "blue")


def test_embeddings_match_the_serving_api(e2e_gateway, serving_stack):
    texts = ["paged attention", "continuous batching"]
    through = get_deploy_client(e2e_gateway.url).predict(endpoint="embeddings", inputs={"input": texts})
    straight = direct(
        serving_stack, "/v1/embeddings", {"model": serving_stack.embedding_model, "input": texts}
    )
    vectors = np.array([d["embedding"] for d in through["data"]])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(vectors, [d["embedding"] for d in straight["data"]], rtol=1e-5, atol=1e-6)


def test_chat_stream_equals_the_plain_answer(e2e_gateway):
    body = {"messages": MESSAGES, "max_tokens": 12, **GREEDY}
    plain = invoke(e2e_gateway, "llama2-chat", body).json()["choices"][0]["message"]["content"]
    with invoke(e2e_gateway, "llama2-chat", {**body, "stream": True}, stream=True) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert "".join(e["choices"][0]["delta"]["content"] or "" for e in events) == plain
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_openai_route_streams_chat_and_completions(e2e_gateway):
    client = OpenAI(base_url=f"{e2e_gateway.url}/v1", api_key="unused")
    plain = client.chat.completions.create(model="llama2-chat", messages=MESSAGES, max_tokens=10, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model="llama2-chat",
            messages=MESSAGES,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == plain.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    prompt = "Once upon a time"
    whole = client.completions.create(model="llama2-completions", prompt=prompt, max_tokens=10, **GREEDY)
    pieces = client.completions.create(
        model="llama2-completions", prompt=prompt, max_tokens=10, stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text


def test_stream_error_before_the_first_chunk_is_a_real_status(e2e_gateway):
    response = invoke(
        e2e_gateway, "llama2-completions", {"prompt": "hi", "max_tokens": 10**7, "stream": True}
    )
    assert response.status_code == 400
    assert str(10**7) in response.json()["detail"]


def test_wrong_key_is_the_serving_tiers_401(e2e_gateway):
    response = invoke(e2e_gateway, "chat-wrong-key", {"messages": MESSAGES})
    assert response.status_code == 401
    assert response.json()["detail"]


def test_serving_down_is_a_503(e2e_gateway):
    response = invoke(e2e_gateway, "chat-down", {"messages": MESSAGES})
    assert response.status_code == 503
    assert response.headers["Retry-After"]


def test_token_budget_counts_real_usage(e2e_gateway):
    # 60 tokens a minute; each request uses its prompt plus 40 forced completion tokens.
    body = {"prompt": "Count to ten:", "max_tokens": 40, "ignore_eos": True, **GREEDY}
    first = invoke(e2e_gateway, "completions-budget", body)
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 40
    assert invoke(e2e_gateway, "completions-budget", body).status_code == 200  # 60 - 40 - prompt > 0 left
    refused = invoke(e2e_gateway, "completions-budget", body)
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1


# -- MLflow's built-in providers on the same serving app -------------------------------------------


def test_builtin_mosaicml_provider_completions(e2e_gateway, serving_stack):
    prompt = "The capital of France is"
    through = get_deploy_client(e2e_gateway.url).predict(
        endpoint="mosaicml-completions", inputs={"prompt": prompt, "max_tokens": 8, "temperature": 0.0}
    )
    body = {"model": serving_stack.model, "prompt": prompt, "max_tokens": 8, **GREEDY}
    assert (
        through["choices"][0]["text"] == direct(serving_stack, "/v1/completions", body)["choices"][0]["text"]
    )


def test_builtin_mosaicml_provider_embeddings(e2e_gateway, serving_stack):
    texts = ["paged attention"]
    through = get_deploy_client(e2e_gateway.url).predict(
        endpoint="mosaicml-embeddings", inputs={"input": texts}
    )
    straight = direct(
        serving_stack, "/v1/embeddings", {"model": serving_stack.embedding_model, "input": texts}
    )
    np.testing.assert_allclose(
        through["data"][0]["embedding"], straight["data"][0]["embedding"], rtol=1e-5, atol=1e-6
    )


def test_builtin_openai_provider(e2e_gateway, serving_stack):
    client = get_deploy_client(e2e_gateway.url)
    chat = client.predict(endpoint="openai-chat", inputs={"messages": MESSAGES, "max_tokens": 8, **GREEDY})
    straight = direct(
        serving_stack,
        "/v1/chat/completions",
        {"model": serving_stack.model, "messages": MESSAGES, "max_tokens": 8, **GREEDY},
    )
    assert chat["choices"][0]["message"]["content"] == straight["choices"][0]["message"]["content"]
    completion = client.predict(
        endpoint="openai-completions", inputs={"prompt": "Hello", "max_tokens": 4, **GREEDY}
    )
    assert completion["usage"]["completion_tokens"] >= 1
    vectors = client.predict(endpoint="openai-embeddings", inputs={"input": "paged attention"})
    assert len(vectors["data"][0]["embedding"]) == 384
    with invoke(
        e2e_gateway,
        "openai-chat",
        {"messages": MESSAGES, "max_tokens": 8, "stream": True, **GREEDY},
        stream=True,
    ) as response:
        events = sse_events(response)
    streamed = "".join(e["choices"][0]["delta"]["content"] or "" for e in events if e["choices"])
    assert streamed == straight["choices"][0]["message"]["content"]


# -- examples --------------------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=300, check=True
    )


def test_rag_example_retrieves_the_relevant_documents(e2e_gateway):
    expected = {
        "How does the server avoid wasting KV cache memory?": "Paged attention",
        "How are model weights split across GPUs?": "Tensor parallelism",
        "How are API keys stored?": "API keys",
    }
    for question, opening in expected.items():
        result = json.loads(
            run_example(
                "rag.py", question, "--gateway-url", e2e_gateway.url, "--max-tokens", "8", "--json"
            ).stdout
        )
        assert result["retrieved"][0]["document"].startswith(opening)
        assert result["retrieved"][0]["score"] > result["retrieved"][1]["score"]
        assert result["usage"]["completion_tokens"] >= 1


def test_quickstart_example_runs(e2e_gateway):
    output = run_example("quickstart.py", "--gateway-url", e2e_gateway.url).stdout
    assert "llama2-chat" in output.splitlines()[0]
    assert "embeddings: 2 x 384" in output
