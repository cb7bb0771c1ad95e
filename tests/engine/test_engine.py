"""The offline engine end to end on random Llama checkpoints, checked against transformers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving import LLM, SamplingParams
from serving.engine.errors import RequestTooLargeError
from tests.fixtures.checkpoints import hf_model

PROMPT_LENS = (5, 17, 42, 64, 100, 150, 233, 300)
NEW_TOKENS = 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
ATOL = 1e-4   # log-probabilities against transformers' (float32 on both sides)


def random_prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 1000, (length - 1,), generator=generator).tolist()


def hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == len(prompt) + new_tokens
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def hf_log_softmax(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row i is the distribution of token i + 1."""
    return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def assert_entry_matches(entry: dict[int, float], token_id: int, row: torch.Tensor, k: int) -> None:
    assert abs(entry[token_id] - row[token_id].item()) < ATOL
    top_lp, top_ids = row.topk(k)
    assert set(entry) == {token_id, *top_ids.tolist()}
    for t, lp in zip(top_ids.tolist(), top_lp.tolist()):
        assert abs(entry[t] - lp) < ATOL


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return [random_prompt(n, seed=i) for i, n in enumerate(PROMPT_LENS)]


@pytest.fixture(scope="module")
def hf_llama(llama_dir: Path):
    return hf_model(llama_dir)


@pytest.fixture(scope="module")
def reference(hf_llama, prompts) -> list[list[int]]:
    return [hf_greedy(hf_llama, p) for p in prompts]


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    """At the defaults: on CPU in float32 that is the native decode-attention kernel."""
    engine = LLM(str(llama_dir), num_kv_blocks=512)
    assert engine.engine.executor.runner.attention_backend == "cpu_kernel"
    return engine


@pytest.fixture(scope="module")
def sdpa_llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), num_kv_blocks=512, attention_backend="sdpa")


@pytest.mark.parametrize("engine", ["llm", "sdpa_llm"])
def test_greedy_parity_with_transformers(engine: str, prompts, reference, request: pytest.FixtureRequest):
    llm = request.getfixturevalue(engine)
    outputs = llm.generate(prompts, GREEDY)
    assert tokens(outputs) == reference
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)
    assert [o.prompt_token_ids for o in outputs] == prompts


def test_greedy_parity_other_architecture_with_chunked_prefill(llama_alt_dir: Path, prompts):
    """Other head counts, untied embeddings, llama3 rope scaling; a 96-token budget chunks every prompt."""
    llm = LLM(str(llama_alt_dir), num_kv_blocks=512, max_num_batched_tokens=96)
    hf = hf_model(llama_alt_dir)
    expected = [hf_greedy(hf, p) for p in prompts]
    assert tokens(llm.generate(prompts, GREEDY)) == expected


def test_preemption_with_a_tiny_pool_keeps_outputs_exact(llama_dir: Path, prompts, reference):
    # 30 blocks of 16 tokens: the longest request (300 + 64 tokens) fits alone, the 8 together do not.
    small = LLM(str(llama_dir), num_kv_blocks=30)
    assert tokens(small.generate(prompts, GREEDY)) == reference
    stats = small.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.num_free_blocks == 30

    with pytest.raises(RequestTooLargeError, match=r"needs 38 KV-cache blocks .* pool has 30 blocks"):
        small.generate([random_prompt(300, seed=99)], SamplingParams(max_tokens=300))
    assert not small.engine.has_unfinished_requests()


@pytest.mark.parametrize("engine", ["llm", "sdpa_llm"])
def test_batch_invariance(engine: str, prompts, reference, monkeypatch, request: pytest.FixtureRequest):
    llm = request.getfixturevalue(engine)
    target, expected = prompts[4], reference[4]
    others = [random_prompt(20 + 13 * i, seed=100 + i) for i in range(15)]
    assert tokens(llm.generate([target], GREEDY)) == [expected]
    # SDPA: the smallest decode tiles (4 sequences each), so the batch runs as several tiles of mixed lengths.
    monkeypatch.setattr(llm.engine.executor.runner.backend, "_tile_tokens", 0)
    batch = others[:7] + [target] + others[7:]
    assert tokens(llm.generate(batch, GREEDY))[7] == expected

    engine = llm.engine
    for i, prompt in enumerate(others):
        engine.add(engine.make_request(f"bg-{i}", prompt, GREEDY))
    for _ in range(10):
        engine.step()
    assert engine.stats().num_running == 15
    engine.add(engine.make_request("late", target, GREEDY))
    late = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == "late":
                late = output
    assert late.outputs[0].token_ids == expected


def test_prefix_cache_hit_gives_identical_tokens(llm, hf_llama):
    system = random_prompt(200, seed=7)
    first = system + random_prompt(21, seed=8)[1:]
    second = system + random_prompt(31, seed=9)[1:]
    llm.generate([first], GREEDY)
    before = llm.engine.stats()
    [out] = llm.generate([second], GREEDY)
    after = llm.engine.stats()
    assert out.num_cached_tokens == 192                    # 12 full blocks of the 200 shared tokens
    assert after.prefix_cache_hits - before.prefix_cache_hits == 192
    assert after.prefix_cache_queries - before.prefix_cache_queries == len(second)
    assert out.outputs[0].token_ids == hf_greedy(hf_llama, second)


def test_sampling_seeds_top_k_and_top_p(llm, prompts, reference):
    prompt = prompts[2]
    seeded = SamplingParams(temperature=1.0, seed=123, max_tokens=NEW_TOKENS, ignore_eos=True)
    [a] = tokens(llm.generate([prompt], seeded))
    # Same seed, now in a batch with unseeded and greedy neighbours: same tokens.
    crowd = [prompts[0], prompt, prompts[5]]
    params = [SamplingParams(temperature=0.7, max_tokens=20), seeded, GREEDY]
    assert tokens(llm.generate(crowd, params))[1] == a
    [b] = tokens(llm.generate([prompt], SamplingParams(temperature=1.0, seed=124, max_tokens=NEW_TOKENS,
                                                       ignore_eos=True)))
    assert a != b
    for params in (SamplingParams(temperature=1.0, top_k=1, max_tokens=NEW_TOKENS, ignore_eos=True),
                   SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=NEW_TOKENS, ignore_eos=True)):
        assert tokens(llm.generate([prompt], params)) == [reference[2]]


def test_n_completions_and_logprobs(llm, prompts, hf_llama):
    """Each of n sampled completions carries, per token, the model's log-probabilities (transformers'
    log-softmax of the logits over the prompt and that completion) of its token and of the top 2."""
    prompt = prompts[1]
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, logprobs=2, ignore_eos=True)
    [out] = llm.generate([prompt], params)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    for c in out.outputs:
        assert len(c.logprobs) == 12
        ref = hf_log_softmax(hf_llama, prompt + c.token_ids)
        for j, (token_id, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            assert_entry_matches(entry, token_id, ref[len(prompt) - 1 + j], 2)


def test_stop_strings_and_streaming(llm, prompts, reference):
    prompt = prompts[3]
    [full] = llm.generate([prompt], GREEDY)
    text = full.outputs[0].text
    stop = text[30:34]
    assert len(stop) == 4 and "\ufffd" not in stop
    cut = text.find(stop)
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop=[stop, "@@@@"]))
    assert out.outputs[0].text == text[:cut]
    assert out.outputs[0].finish_reason == "stop"
    assert reference[3][:len(out.outputs[0].token_ids)] == out.outputs[0].token_ids

    # Streamed: the increments concatenate to the final text and token ids.
    engine = llm.engine
    engine.add(engine.make_request("stream", prompt, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop=[stop]),
                       stream=True))
    pieces, ids, outputs = [], [], []
    while engine.has_unfinished_requests():
        for o in engine.step():
            outputs.append(o)
            pieces.append(o.outputs[0].delta_text)
            ids += o.outputs[0].delta_token_ids
            assert o.outputs[0].text == "".join(pieces)
    assert len(outputs) > 5 and outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    assert "".join(pieces) == text[:cut] and ids == out.outputs[0].token_ids


def test_stop_token_ids(llm, prompts, reference):
    expected = reference[6]
    stop_token = expected[10]
    end = expected.index(stop_token) + 1
    [out] = llm.generate([prompts[6]], SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                                      stop_token_ids=[stop_token]))
    assert out.outputs[0].token_ids == expected[:end] and out.outputs[0].finish_reason == "stop"


def test_eos_ends_a_request_unless_ignored(llm, prompts, reference, monkeypatch):
    expected = reference[5]
    # Random weights seldom produce </s>: make a token greedy decoding is known to produce the EOS.
    eos = expected[20]
    monkeypatch.setattr(llm.engine, "eos_token_ids", frozenset({eos}))
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    [out] = llm.generate([prompts[5]], params)
    assert out.outputs[0].token_ids == expected[:expected.index(eos) + 1]
    assert out.outputs[0].finish_reason == "stop"
    assert tokens(llm.generate([prompts[5]], GREEDY)) == [expected]


def test_abort_frees_blocks(llm, prompts):
    engine = llm.engine
    free_before = engine.stats().num_free_blocks
    engine.add(engine.make_request("to-abort", prompts[7], GREEDY))
    engine.add(engine.make_request("waiting", prompts[6], GREEDY))
    for _ in range(3):
        engine.step()
    assert engine.stats().num_free_blocks < free_before
    assert engine.abort_request("to-abort") and engine.abort_request("waiting")
    assert not engine.abort_request("to-abort")
    assert engine.stats().num_free_blocks == free_before
    assert not engine.has_unfinished_requests()


def test_validation_errors_name_the_problem(llm, prompts):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([""])
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match=r"300 tokens and max_tokens is 800: 1100 exceeds .* 1024 tokens"):
        llm.generate([prompts[7]], SamplingParams(max_tokens=800))
    with pytest.raises(ValueError, match=r"token id 5000 is outside the vocabulary \[0, 1000\)"):
        llm.generate([[1, 5000]])
    for field, value in [("temperature", -1.0), ("top_p", 0.0), ("top_k", 0), ("max_tokens", 0), ("n", 0),
                         ("seed", -3), ("stop", [""]), ("logprobs", 50)]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
    # One bad prompt in a batch: nothing runs.
    with pytest.raises(ValueError):
        llm.generate([prompts[0], ""], GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_chat_uses_the_llama2_template(tiny_chat_dir: Path):
    llm = LLM(str(tiny_chat_dir), num_kv_blocks=64)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    [out] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8))
    tokenizer = llm.get_tokenizer()
    expected = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello there [/INST]"
    assert tokenizer.decode(out.prompt_token_ids) == expected
    assert out.prompt_token_ids.count(1) == 1
    assert len(out.outputs[0].token_ids) <= 8
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        llm.chat([{"role": "bot", "content": "hi"}])
    with pytest.raises(ValueError, match="alternate"):
        llm.chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
