"""Every endpoint's happy path against the real Ray Serve stack, streamed and not."""
from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from tests.serving.helpers import scrape, sse_payloads

SAMPLED = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 1234}


@pytest.fixture(scope="module")
def client(serving_stack):
    with httpx.Client(base_url=serving_stack.base_url, headers=serving_stack.headers(), timeout=120) as c:
        yield c


def test_models_lists_both(client, serving_stack):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    ids = {m["id"]: m for m in body["data"]}
    assert set(ids) == {serving_stack.model, serving_stack.embedding_model}
    assert ids[serving_stack.model]["max_model_len"] == 4096


def test_completion_stream_concatenates_to_the_answer(client, serving_stack):
    request = {"model": serving_stack.model, "prompt": "Once upon a time", "max_tokens": 24, **SAMPLED}
    full = client.post("/v1/completions", json=request).json()
    (choice,) = full["choices"]
    assert choice["finish_reason"] in ("stop", "length") and choice["text"]
    usage = full["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    r = client.post("/v1/completions", json={**request, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(r.text)
    assert all(c["object"] == "text_completion" for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == choice["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == choice["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage


def test_completion_batch_of_prompts_with_n(client, serving_stack):
    r = client.post("/v1/completions", json={"model": serving_stack.model, "prompt": ["Hello", "The sky is"],
                                             "n": 2, "max_tokens": 8, "ignore_eos": True, "temperature": 1.0})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 4 * 8
    # OpenAI counts each prompt once, however many samples it has; counted by the model's own tokenizer
    # (not by our /v1/tokenize, which shares the ingress's code path with the usage it would check).
    from transformers import AutoTokenizer

    from serving.models.tiny import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(serving_stack.model))
    expected = len(tokenizer.encode("Hello")) + len(tokenizer.encode("The sky is"))
    assert body["usage"]["prompt_tokens"] == expected


def test_greedy_is_deterministic_and_token_ids_are_accepted(client, serving_stack):
    ids = client.post("/v1/tokenize", json={"model": serving_stack.model, "prompt": "Tell me a story"}).json()
    by_text = client.post("/v1/completions", json={"model": serving_stack.model, "prompt": "Tell me a story",
                                                   "max_tokens": 12, "temperature": 0}).json()
    by_ids = client.post("/v1/completions", json={"model": serving_stack.model, "prompt": ids["tokens"],
                                                  "max_tokens": 12, "temperature": 0}).json()
    assert by_text["choices"][0]["text"] == by_ids["choices"][0]["text"]
    assert by_text["usage"] == by_ids["usage"]


CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": [{"type": "text", "text": "Another one?"}]},
]


def test_chat_stream_matches_non_stream(client, serving_stack):
    request = {"model": serving_stack.model, "messages": CONVERSATION, "max_tokens": 20, **SAMPLED}
    full = client.post("/v1/chat/completions", json=request).json()
    assert full["object"] == "chat.completion"
    (choice,) = full["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")

    r = client.post("/v1/chat/completions", json={**request, "stream": True})
    chunks = sse_payloads(r.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_chat_applies_the_llama2_template(client, serving_stack):
    """Prompt tokens of the chat equal the template's, and the template is Llama-2's [INST] <<SYS>> one."""
    from transformers import AutoTokenizer

    from serving.models.tiny import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(serving_stack.model))
    text = tokenizer.apply_chat_template([{**m, "content": m["content"] if isinstance(m["content"], str)
                                           else m["content"][0]["text"]} for m in CONVERSATION],
                                         tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s>[INST] <<SYS>>\nYou are a terse assistant.\n<</SYS>>\n\nName a colour. [/INST]")
    expected = tokenizer.encode(text, add_special_tokens=False)
    counted = client.post("/v1/tokenize", json={"model": serving_stack.model, "messages": CONVERSATION}).json()
    assert counted["tokens"] == expected
    usage = client.post("/v1/chat/completions", json={"model": serving_stack.model, "messages": CONVERSATION,
                                                      "max_tokens": 2}).json()["usage"]
    assert usage["prompt_tokens"] == len(expected)


def test_ingress_tokenization_matches_the_engine(serving_stack, client):
    """The ingress tokenizes for the engine; it must agree with the engine's own encode and encode_chat."""
    from serving.config import EngineConfig
    from serving.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=serving_stack.model, num_kv_blocks=8))
    messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                 else m["content"][0]["text"]} for m in CONVERSATION]
    chat = client.post("/v1/tokenize", json={"model": serving_stack.model, "messages": CONVERSATION}).json()
    assert chat["tokens"] == engine.encode_chat(messages)
    text = "  A prompt with  spaces, ünïcode and 数字 "
    plain = client.post("/v1/tokenize", json={"model": serving_stack.model, "prompt": text}).json()
    assert plain["tokens"] == engine.encode(text)


def test_chat_n_and_usage_chunk(client, serving_stack):
    r = client.post("/v1/chat/completions", json={
        "model": serving_stack.model, "messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 6,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "seed": 3})
    chunks = sse_payloads(r.text)
    assert {c["choices"][0]["index"] for c in chunks[1:-1]} == {0, 1}
    finished = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finished) == [0, 1]
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_embeddings_float_and_base64(client, serving_stack):
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly revenue beat expectations."]
    body = client.post("/v1/embeddings", json={"model": serving_stack.embedding_model, "input": texts}).json()
    vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    assert body["usage"]["prompt_tokens"] > 10 and body["usage"]["completion_tokens"] == 0

    b64 = client.post("/v1/embeddings", json={"model": serving_stack.embedding_model, "input": texts[0],
                                             "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype=np.float32)
    np.testing.assert_allclose(decoded, vectors[0], atol=1e-6)


def test_predict_text_streamed_and_not(client, serving_stack):
    body = {"inputs": ["Write a haiku", "Count to five"],
            "parameters": {"max_new_tokens": 16, "temperature": 0.7, "seed": 5}}
    full = client.post(f"/{serving_stack.model}/v1/predict", json=body).json()
    assert len(full["outputs"]) == 2 and all(isinstance(o, str) and o for o in full["outputs"])
    assert full["usage"]["completion_tokens"] <= 32 and len(full["finish_reasons"]) == 2

    chunks = sse_payloads(client.post(f"/{serving_stack.model}/v1/predict", json={**body, "stream": True}).text)
    streamed = ["", ""]
    for c in chunks:
        streamed[c["index"]] += c["outputs"][0]
    assert streamed == full["outputs"]

    greedy = {"inputs": ["Hello"], "parameters": {"max_new_tokens": 10, "temperature": 0}}
    again = [client.post(f"/{serving_stack.model}/v1/predict", json=greedy).json()["outputs"] for _ in range(2)]
    assert again[0] == again[1]


def test_predict_embeddings_raw_key_header(serving_stack):
    r = httpx.post(f"{serving_stack.base_url}/{serving_stack.embedding_model}/v1/predict",
                   headers={"Authorization": serving_stack.api_key}, json={"inputs": ["one", "two"]}, timeout=60)
    assert r.status_code == 200
    outputs = r.json()["outputs"]
    assert len(outputs) == 2 and all(len(v) == 384 for v in outputs)


def test_health_and_metrics_need_no_key(serving_stack, client):
    health = httpx.get(f"{serving_stack.base_url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    replicas = health.json()["replicas"]
    assert sum(r["model"] == serving_stack.model and r["healthy"] for r in replicas) == 2

    client.post("/v1/completions", json={"model": serving_stack.model, "prompt": "hi", "max_tokens": 4})
    samples = scrape(serving_stack.base_url)
    requests = {(s["endpoint"], s["status"], s["key"]): v for s, v in samples["mosaic_requests_total"]}
    assert requests[("/v1/completions", "200", "test")] >= 1
    for name in ("mosaic_prompt_tokens_total", "mosaic_generation_tokens_total",
                 "mosaic_time_to_first_token_seconds_count", "mosaic_inter_token_latency_seconds_count",
                 "mosaic_num_waiting_seqs", "mosaic_num_running_seqs", "mosaic_kv_cache_usage_ratio",
                 "mosaic_preemptions_total", "mosaic_prefix_cache_hit_rate", "mosaic_kv_cache_bytes_per_token",
                 "mosaic_kv_cache_capacity_tokens", "mosaic_kv_cache_info"):
        assert name in samples, name
    assert sum(v for _, v in samples["mosaic_generation_tokens_total"]) >= 4
    assert len(samples["mosaic_kv_cache_usage_ratio"]) == 2  # one series per LLM replica


def test_openai_client_works_unchanged(serving_stack):
    import openai

    client = openai.OpenAI(base_url=f"{serving_stack.base_url}/v1", api_key=serving_stack.api_key, max_retries=0)
    assert {m.id for m in client.models.list()} == {serving_stack.model, serving_stack.embedding_model}

    stream = client.chat.completions.create(model=serving_stack.model, max_tokens=12, stream=True, seed=9,
                                            messages=[{"role": "user", "content": "Say something"}])
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    full = client.chat.completions.create(model=serving_stack.model, max_tokens=12, seed=9,
                                          messages=[{"role": "user", "content": "Say something"}])
    assert "".join(pieces) == full.choices[0].message.content and finish == full.choices[0].finish_reason

    completion = client.completions.create(model=serving_stack.model, prompt="1, 2, 3,", max_tokens=5)
    assert 0 < completion.usage.completion_tokens <= 5
    assert completion.choices[0].finish_reason in ("stop", "length")

    emb = client.embeddings.create(model=serving_stack.embedding_model, input=["hello", "world"])
    assert [len(d.embedding) for d in emb.data] == [384, 384]

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
