"""The OpenAI fields clients send, through the real serving stack: logprobs (with the openai client, streamed
and not) against transformers' log-softmax, echo and prompt logprobs, penalties and bias, structured output,
and unsupported fields answered 400 by name."""
from __future__ import annotations

import itertools
import json

import httpx
import jsonschema
import openai
import pytest

from serving.engine.prompts import encode_chat
from serving.models.tiny import resolve_model
from tests.engine.test_engine import hf_greedy, hf_log_softmax
from tests.fixtures.checkpoints import hf_model

ATOL = 1e-4
PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture(scope="module")
def client(serving_stack):
    with httpx.Client(base_url=serving_stack.base_url, headers=serving_stack.headers(), timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def oai(serving_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serving_stack.base_url}/v1", api_key=serving_stack.api_key, max_retries=0)


@pytest.fixture(scope="module")
def reference(serving_stack):
    """transformers on the very checkpoint the replicas serve, and its tokenizer."""
    from transformers import AutoTokenizer

    path = resolve_model(serving_stack.model)
    return hf_model(path), AutoTokenizer.from_pretrained(path)


def flat(lists) -> list:
    return list(itertools.chain.from_iterable(lists))


def test_completion_logprobs_streamed_and_not_equal_transformers(oai, serving_stack, reference):
    model, tokenizer = reference
    kwargs = {"model": serving_stack.model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 3,
              "extra_body": {"ignore_eos": True}}
    full = oai.completions.create(**kwargs).choices[0]
    lp = full.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == full.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    prompt_ids = tokenizer.encode(PROMPT)
    generated = hf_greedy(model, prompt_ids, 6)
    assert tokenizer.decode(generated, skip_special_tokens=True) == full.text
    ref = hf_log_softmax(model, prompt_ids + generated)
    for j, token_id in enumerate(generated):
        row = ref[len(prompt_ids) - 1 + j]
        assert abs(lp.token_logprobs[j] - row[token_id].item()) < ATOL
        # Greedy: the chosen token is the best, so the entry is exactly the top 3 (keyed by their text).
        assert sorted(lp.top_logprobs[j].values(), reverse=True) == pytest.approx(row.topk(3).values.tolist(),
                                                                                  abs=ATOL)
        assert lp.token_logprobs[j] in lp.top_logprobs[j].values()

    chunks = list(oai.completions.create(**kwargs, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert flat(s.tokens for s in streamed) == lp.tokens
    # Equal up to float rounding, not bit for bit: the second request hits the prefix cache, so its prefill
    # has fewer rows and the linear layers take another matmul routine (serving/layers/linear.py).
    assert flat(s.token_logprobs for s in streamed) == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert flat(s.text_offset for s in streamed) == lp.text_offset
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.text


def test_echo_scores_the_prompt_like_transformers(client, oai, serving_stack, reference):
    model, tokenizer = reference
    prompt_ids = tokenizer.encode(PROMPT)
    ref = hf_log_softmax(model, prompt_ids)
    body = client.post("/v1/completions", json={"model": serving_stack.model, "prompt": PROMPT, "echo": True,
                                                "max_tokens": 0, "logprobs": 1, "temperature": 0}).json()
    (choice,) = body["choices"]
    assert choice["text"] == PROMPT and body["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt_ids) and "".join(lp["tokens"]) == PROMPT
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(prompt_ids)):
        assert abs(lp["token_logprobs"][i] - ref[i - 1, prompt_ids[i]].item()) < ATOL
    # Token-id prompts (what lm-eval sends), a batch, one generated token after the echo; also streamed.
    batch = oai.completions.create(model=serving_stack.model, prompt=[prompt_ids, prompt_ids[:5]], echo=True,
                                   max_tokens=1, logprobs=1, temperature=0)
    first = batch.choices[0].logprobs
    assert len(first.tokens) == len(prompt_ids) + 1
    assert first.token_logprobs[1:len(prompt_ids)] == pytest.approx(lp["token_logprobs"][1:], abs=ATOL)
    assert len(batch.choices[1].logprobs.tokens) == 6
    chunks = list(oai.completions.create(model=serving_stack.model, prompt=PROMPT, echo=True, max_tokens=0,
                                         logprobs=1, temperature=0, stream=True))
    streamed = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in streamed) == PROMPT
    assert flat(c.logprobs.token_logprobs for c in streamed if c.logprobs) == pytest.approx(lp["token_logprobs"],
                                                                                            abs=1e-5)


def test_chat_logprobs_streamed_and_not(oai, serving_stack, reference):
    model, tokenizer = reference
    messages = [{"role": "user", "content": "Say something"}]
    kwargs = {"model": serving_stack.model, "messages": messages,
              "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2,
              "extra_body": {"ignore_eos": True}}
    full = oai.chat.completions.create(**kwargs).choices[0]
    content = full.logprobs.content
    assert len(content) == 5 and "".join(t.token for t in content) == full.message.content
    prompt_ids = encode_chat(tokenizer, messages)
    generated = hf_greedy(model, prompt_ids, 5)
    ref = hf_log_softmax(model, prompt_ids + generated)
    for j, t in enumerate(content):
        row = ref[len(prompt_ids) - 1 + j]
        assert abs(t.logprob - row[generated[j]].item()) < ATOL
        assert [top.logprob for top in t.top_logprobs] == pytest.approx(row.topk(2).values.tolist(), abs=ATOL)
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)          # greedy: the best one
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token or len(t.bytes) == 1
    chunks = list(oai.chat.completions.create(**kwargs, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    # Up to float rounding (see the completions test above: a prefix-cache hit changes the matmul routine).
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)
    plain = oai.chat.completions.create(**{k: v for k, v in kwargs.items() if "logprobs" not in k}).choices[0]
    assert plain.logprobs is None and plain.message.content == full.message.content


def test_penalties_and_bias_reach_the_sampler(client, serving_stack, reference):
    _, tokenizer = reference
    forced = tokenizer.encode("fox", add_special_tokens=False)[-1]
    base = {"model": serving_stack.model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    r = client.post("/v1/completions", json={**base, "logit_bias": {str(forced): 100}, "logprobs": 0})
    assert r.status_code == 200
    tokens = r.json()["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == 4 and len(set(tokens)) == 1
    plain = client.post(f"/{serving_stack.model}/v1/predict",
                        json={"inputs": [PROMPT], "parameters": {"max_new_tokens": 24, "temperature": 0}}).json()
    penalized = client.post(f"/{serving_stack.model}/v1/predict", json={
        "inputs": [PROMPT], "parameters": {"max_new_tokens": 24, "temperature": 0, "repetition_penalty": 2.0}}).json()
    assert penalized["outputs"] != plain["outputs"]
    for field, value in [("presence_penalty", 2.5), ("logit_bias", {"5": 200}), ("repetition_penalty", 0)]:
        r = client.post("/v1/completions", json={**base, field: value})
        assert r.status_code == 422 and field in r.json()["error"]["message"]


SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer",
                                                                                             "minimum": 0,
                                                                                             "maximum": 9}},
          "required": ["answer", "confidence"], "additionalProperties": False}


def test_structured_output(oai, client, serving_stack):
    messages = [{"role": "user", "content": "Always output your answer in JSON. Is the sky blue?"}]
    out = oai.chat.completions.create(
        model=serving_stack.model, messages=messages, max_tokens=64, temperature=1.0, seed=3, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    chunks = list(oai.chat.completions.create(
        model=serving_stack.model, messages=messages, max_tokens=64, temperature=1.0, seed=3, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    obj = oai.chat.completions.create(model=serving_stack.model, messages=messages, max_tokens=48, temperature=0.5,
                                      seed=1, response_format={"type": "json_object"}).choices[0]
    assert obj.message.content.startswith("{")
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.message.content), dict)
    base = {"model": serving_stack.model, "prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "seed": 2}
    choice = client.post("/v1/completions", json={**base, "guided_choice": ["red", "green"]}).json()["choices"][0]
    assert choice["text"] in ("red", "green") and choice["finish_reason"] == "stop"
    regex = client.post("/v1/completions", json={**base, "guided_regex": "[0-9]{2}-[a-c]{3}"}).json()["choices"][0]
    assert regex["finish_reason"] == "stop" and len(regex["text"]) == 6 and regex["text"][2] == "-"
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    completion = client.post("/v1/completions", json={**base, "max_tokens": 64, "response_format": schema}).json()
    jsonschema.validate(json.loads(completion["choices"][0]["text"]), SCHEMA)
    for extra, field in [({"guided_regex": "(", }, "guided_decoding.regex"),
                         ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex")]:
        r = client.post("/v1/completions", json={**base, **extra})
        assert r.status_code == 400 and field in r.json()["error"]["message"]


@pytest.mark.parametrize("endpoint,extra,field", [
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("chat", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("chat", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("chat", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content[1].type"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"suffix": "the end"}, "suffix"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
])
def test_unsupported_fields_are_400_by_name(client, serving_stack, endpoint, extra, field):
    if endpoint == "chat":
        body = {"model": serving_stack.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        path = "/v1/chat/completions"
    else:
        body = {"model": serving_stack.model, "prompt": "hi", "max_tokens": 2}
        path = "/v1/completions"
    r = client.post(path, json={**body, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "unsupported_field" and field in error["message"]


def test_off_values_of_unsupported_fields_are_accepted(client, serving_stack):
    chat = {"model": serving_stack.model, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 2, "tools": None, "tool_choice": "none", "parallel_tool_calls": True, "functions": None,
            "modalities": ["text"], "logprobs": False, "response_format": {"type": "text"}}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    completion = {"model": serving_stack.model, "prompt": "hi", "max_tokens": 2, "best_of": 1, "suffix": None,
                  "echo": False, "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}
    assert client.post("/v1/completions", json=completion).status_code == 200
