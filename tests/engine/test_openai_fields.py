"""Log-probabilities (generated and prompt), penalties, logit_bias, min_tokens and structured output in the
engine, judged against transformers on a random checkpoint."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from serving import LLM, SamplingParams
from serving.sampling_params import GuidedDecodingParams
from tests.engine.test_detokenizer import cut_after_min_tokens
from tests.engine.test_engine import ATOL, assert_entry_matches, hf_greedy, hf_log_softmax, random_prompt
from tests.engine.test_fault_isolation import poisoned, run_to_end
from tests.fixtures.checkpoints import hf_model


@pytest.fixture(scope="module")
def hf(llama_dir: Path):
    return hf_model(llama_dir)


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    # A 48-token budget: the longer prompts prefill in several chunks.
    return LLM(str(llama_dir), num_kv_blocks=256, max_num_batched_tokens=48)


def test_logprobs_and_prompt_logprobs_equal_transformers(llm, hf):
    prompts = [random_prompt(n, seed=40 + n) for n in (5, 47, 130)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        gen = out.outputs[0].token_ids
        ref = hf_log_softmax(hf, prompt + gen)
        assert len(out.outputs[0].logprobs) == len(gen) == 8
        for j, (token_id, entry) in enumerate(zip(gen, out.outputs[0].logprobs)):
            assert_entry_matches(entry, token_id, ref[len(prompt) - 1 + j], 5)
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for i in range(1, len(prompt)):
            assert_entry_matches(out.prompt_logprobs[i], prompt[i], ref[i - 1], 3)


def test_prompt_logprobs_are_not_lost_to_the_prefix_cache(llm, hf):
    prompt = random_prompt(100, seed=77)
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    llm.generate([prompt], plain)                         # caches 6 full blocks of the prompt
    [warm] = llm.generate([prompt], plain)
    assert warm.num_cached_tokens == 96
    [out] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, n=2))
    ref = hf_log_softmax(hf, prompt)
    assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        assert out.prompt_logprobs[i].keys() == {prompt[i]}
        assert abs(out.prompt_logprobs[i][prompt[i]] - ref[i - 1, prompt[i]].item()) < ATOL


def test_greedy_with_repetition_penalty_equals_transformers(llm, hf):
    prompts = [random_prompt(n, seed=90 + n) for n in (6, 60)]
    for prompt in prompts:
        [out] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True,
                                                      repetition_penalty=1.3))
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                          repetition_penalty=1.3)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref
        assert ref != hf_greedy(hf, prompt, 32)           # the penalty changed the output


def test_penalties_through_slot_reuse_and_fault_isolation(llama_dir: Path, hf):
    """Two penalty slots (max_num_seqs=2) for six penalized requests of different lengths, one poisoned
    request failing steps in between: every request equals its reference (transformers for the repetition
    penalty, the request alone for frequency/presence), so no count leaks between slots or is lost or
    doubled by a re-run step."""
    small = LLM(str(llama_dir), num_kv_blocks=256, max_num_seqs=2)
    engine = small.engine
    prompts = [random_prompt(n, seed=200 + n) for n in (5, 31, 12, 50, 8, 20)]
    lengths = [20, 7, 26, 12, 16, 9]
    repetition = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, repetition_penalty=1.4)
                  for m in lengths[:3]]
    openai = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, frequency_penalty=1.1,
                             presence_penalty=0.7) for m in lengths[3:]]
    alone = [small.generate([p], params)[0].outputs[0].token_ids for p, params in zip(prompts[3:], openai)]
    requests = [engine.make_request(f"r{i}", p, params) for i, (p, params) in enumerate(zip(prompts, repetition + openai))]
    requests.insert(3, poisoned(engine.make_request, "bad", random_prompt(15, seed=4)))
    for request in requests:
        engine.add(request)
    outputs, failures = run_to_end(engine)
    assert set(failures) == {"bad"}
    for i, (prompt, params) in enumerate(zip(prompts[:3], repetition)):
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=params.max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                          repetition_penalty=1.4)[0, len(prompt):].tolist()
        assert outputs[f"r{i}"].outputs[0].token_ids == ref
    assert [outputs[f"r{i}"].outputs[0].token_ids for i in range(3, 6)] == alone


def test_logit_bias_and_min_tokens(llm):
    prompt = random_prompt(20, seed=3)
    eos = 2
    # EOS pushed up by 100: it is chosen as soon as min_tokens allows.
    [out] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10, min_tokens=4,
                                                  logit_bias={eos: 100.0}))
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].token_ids[-1] == eos
    assert out.outputs[0].finish_reason == "stop"
    # -100 bans: the banned tokens never appear, even sampled hot.
    [base] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    banned = set(base.outputs[0].token_ids)
    [out] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                  logit_bias={t: -100.0 for t in banned}))
    assert not banned & set(out.outputs[0].token_ids)


def test_min_tokens_holds_off_stop_strings(llm):
    prompt = random_prompt(20, seed=3)
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    [base] = llm.generate([prompt], plain)
    text = base.outputs[0].text
    min_tokens = 6
    [prefix] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=min_tokens, ignore_eos=True))
    head = prefix.outputs[0].text
    assert text.startswith(head) and 0 < len(head) < len(text)
    # A stop string from the first tokens' text: alone it ends the request there.
    stop = head[len(head) // 2:][:2]
    [early] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]))
    assert early.outputs[0].text == text[:text.find(stop)] and len(early.outputs[0].token_ids) <= min_tokens
    # With min_tokens it is ignored there; only a match ending in a later token's text ends the request.
    [out] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop],
                                                  min_tokens=min_tokens))
    cut = cut_after_min_tokens(text, stop, len(head))
    completion = out.outputs[0]
    assert completion.text == text[:cut] and len(completion.token_ids) > min_tokens
    assert completion.finish_reason == ("length" if cut is None else "stop")
    assert completion.token_ids == base.outputs[0].token_ids[:len(completion.token_ids)]


def test_frequency_and_presence_penalties_reduce_repeats(llm):
    prompt = random_prompt(10, seed=11)
    [plain] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    [pen] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                                  frequency_penalty=2.0, presence_penalty=2.0))

    def repeats(ids: list[int]) -> int:
        return len(ids) - len(set(ids))

    assert repeats(pen.outputs[0].token_ids) < repeats(plain.outputs[0].token_ids)


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["s", "m", "l"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["ok", "size", "n"], "additionalProperties": False}


@pytest.mark.parametrize("guide,check", [
    (GuidedDecodingParams(json=SCHEMA), lambda text: jsonschema.validate(json.loads(text), SCHEMA)),
    (GuidedDecodingParams(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text)),
    (GuidedDecodingParams(choice=["yes", "no", "maybe so"]), lambda text: text in ("yes", "no", "maybe so")),
])
def test_structured_output_is_valid(llm, guide, check):
    prompt = random_prompt(30, seed=5)
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=64, guided_decoding=guide)
    [out] = llm.generate([prompt], params)
    for c in out.outputs:
        assert c.finish_reason == "stop"
        assert check(c.text) is not False


def test_invalid_fields_are_value_errors(llm):
    for kwargs, field in [({"logit_bias": {5: 101}}, "logit_bias"), ({"presence_penalty": 3}, "presence_penalty"),
                          ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
                          ({"repetition_penalty": 0}, "repetition_penalty"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
                          ({"guided_decoding": {"regex": "a", "choice": ["b"]}}, "guided_decoding")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([[1, 5, 6]], SamplingParams(logit_bias={10**6: 1.0}))
    with pytest.raises(ValueError, match="guided_decoding.regex"):
        llm.generate([[1, 5, 6]], SamplingParams(guided_decoding=GuidedDecodingParams(regex="(unclosed")))


def test_prompt_logprobs_survive_preemption(llama_dir: Path, hf):
    # 20 blocks: three 150-token prompts growing by 40 tokens each cannot all stay; prefills go in 32-token chunks.
    small = LLM(str(llama_dir), num_kv_blocks=20, max_num_batched_tokens=32)
    prompts = [random_prompt(150, seed=60 + i) for i in range(3)]
    outs = small.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, prompt_logprobs=1))
    assert small.engine.stats().num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        ref = hf_log_softmax(hf, prompt)
        assert len(out.prompt_logprobs) == len(prompt)
        for i in range(1, len(prompt)):
            assert_entry_matches(out.prompt_logprobs[i], prompt[i], ref[i - 1], 1)
