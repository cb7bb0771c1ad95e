"""Fault isolation at tensor_parallel_size=2 (a gloo follower process): a request whose step raises on every
rank fails alone, the others get transformers' greedy tokens and the engine serves on; a fault on one rank
only ends the engine within the grace, with an error naming the rank."""
from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving import LLM, SamplingParams
from serving.engine import tp_executor
from serving.engine.errors import EngineDeadError
from tests.engine import test_fault_isolation
from tests.engine.test_engine import random_prompt
from tests.engine.test_fault_isolation import GREEDY, run_to_end
from tests.fixtures.rank_fault import FAULT_IDS, RankOneFaultRunner

# The single-process tests' prompts and transformers' greedy tokens for them (GREEDY).
prompts, reference = test_fault_isolation.prompts, test_fault_isolation.reference
TP_TIMEOUT_S = 5.0   # half of it is the grace a rank has to fail a step another rank failed


@pytest.fixture(scope="module")
def tp_llm(llama_dir: Path) -> Iterator[LLM]:
    # The follower builds the runner the driver names: rank 1 fails the steps whose prompts hold FAULT_IDS.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tp_executor, "ModelRunner", RankOneFaultRunner)
        llm = LLM(str(llama_dir), tensor_parallel_size=2, num_kv_blocks=256, tp_timeout_s=TP_TIMEOUT_S)
    yield llm
    llm.shutdown()


def poisoned(make_request, request_id: str, prompt: list[int]):
    """A request the engine's checks let through with prompt_logprobs=1, then asking for more top entries than
    the vocabulary has: every rank's step raises in the prompt logprobs (after the model's collectives and one
    all-gather of prompt logits, before the sampler's)."""
    request = make_request(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=12, prompt_logprobs=1))
    request.params = copy.copy(request.params)
    request.params.prompt_logprobs = 10**6
    return request


def test_a_request_that_fails_every_rank_fails_alone(tp_llm, prompts, reference):
    engine = tp_llm.engine
    for i, prompt in enumerate(prompts[:2]):
        engine.add(engine.make_request(f"good{i}", prompt, GREEDY))
    engine.add(poisoned(engine.make_request, "bad", random_prompt(30, seed=9)))
    engine.add(engine.make_request("good2", prompts[2], GREEDY))
    outputs, failures = run_to_end(engine)
    assert set(failures) == {"bad"} and "bad" not in outputs
    assert "could not run this request" in str(failures["bad"]) and "out of range" in str(failures["bad"])
    assert [outputs[f"good{i}"].outputs[0].token_ids for i in range(3)] == reference
    # Alone (the probe step tells the request from the engine), then still serving.
    engine.add(poisoned(engine.make_request, "alone", random_prompt(12, seed=4)))
    assert engine.step() == [] and set(engine.pop_failures()) == {"alone"}
    engine.check_health()
    assert [o.outputs[0].token_ids for o in tp_llm.generate(prompts, GREEDY)] == reference
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


def test_a_fault_on_one_rank_ends_the_engine_within_the_grace(tp_llm, prompts):
    """Rank 1 raises before the step's first collective, where rank 0 waits for it: the wait ends after the
    grace (not the collective's timeout: that error would name no rank), and the engine is dead."""
    with pytest.raises(EngineDeadError, match=r"rank 1 failed step \d+ alone \(RuntimeError: injected fault on "
                                              r"rank 1\) while rank 0 waited for it"):
        tp_llm.generate([[1, *FAULT_IDS, 5]], GREEDY)
    with pytest.raises(EngineDeadError, match="rank 1 failed"):
        tp_llm.engine.check_health()
    with pytest.raises(EngineDeadError, match="rank 1 failed"):
        tp_llm.generate([prompts[0]], GREEDY)
