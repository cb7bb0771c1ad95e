"""A request that makes the model step raise fails alone; the others finish with exact tokens."""
from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest

from serving import LLM, SamplingParams
from serving.config import EngineConfig
from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.errors import EngineDeadError, RequestFailedError
from tests.engine.test_engine import hf_greedy, random_prompt
from tests.fixtures.checkpoints import hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# Passes the engine's checks as top_k=5, then is made unrepresentable as int64: building the step's sampling
# tensors (a real path, ModelRunner._sampling_tensors) raises for it.
POISON_TOP_K = 2**70


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), num_kv_blocks=256)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return [random_prompt(n, seed=300 + n) for n in (9, 40, 75)]


@pytest.fixture(scope="module")
def reference(llama_dir: Path, prompts) -> list[list[int]]:
    hf = hf_model(llama_dir)
    return [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]


def poisoned(make_request, request_id: str, prompt: list[int]):
    request = make_request(request_id, prompt, SamplingParams(temperature=1.0, top_k=5, max_tokens=12))
    request.params = copy.copy(request.params)
    request.params.top_k = POISON_TOP_K
    return request


def run_to_end(engine) -> tuple[dict, dict]:
    outputs, failures = {}, {}
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            outputs[out.request_id] = out
        failures.update(engine.pop_failures())
    return outputs, failures


@pytest.mark.parametrize("bad_position", [0, 2, 3])
def test_culprit_anywhere_in_the_batch_fails_alone(llm, prompts, reference, bad_position):
    engine = llm.engine
    good = [engine.make_request(f"good{i}", p, GREEDY) for i, p in enumerate(prompts)]
    order = [*good]
    order.insert(bad_position, poisoned(engine.make_request, "bad", random_prompt(30, seed=9)))
    for request in order:
        engine.add(request)
    outputs, failures = run_to_end(engine)
    assert set(failures) == {"bad"} and "bad" not in outputs
    assert "could not run this request" in str(failures["bad"])
    assert [outputs[f"good{i}"].outputs[0].token_ids for i in range(3)] == reference
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0
    # Still serving afterwards.
    [again] = llm.generate([prompts[0]], GREEDY)
    assert again.outputs[0].token_ids == reference[0]


def test_offline_generate_raises_the_failure_and_stays_usable(llm, prompts, reference):
    engine = llm.engine
    real = engine.make_request

    def make(request_id, prompt, params, stream=False):
        return poisoned(real, request_id, prompt) if request_id == "1" else real(request_id, prompt, params, stream)

    llm._request_ids = iter(range(10**6))
    engine.make_request = make
    try:
        with pytest.raises(RequestFailedError):
            llm.generate(prompts[:2], GREEDY)
    finally:
        del engine.make_request
    assert not engine.has_unfinished_requests()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == reference


def test_poisoned_requests_in_a_row_fail_alone_and_the_engine_serves_on(llm, prompts, reference):
    """A hostile client sending poison after poison, each alone in the engine (no good step in between),
    or several at once: a probe step proves the engine healthy every time, so only they fail."""
    engine = llm.engine
    steps_before = engine.num_steps
    for i in range(4):
        engine.add(poisoned(engine.make_request, f"alone{i}", random_prompt(12 + i, seed=40 + i)))
        assert engine.step() == [] and set(engine.pop_failures()) == {f"alone{i}"}
    for i in range(3):
        engine.add(poisoned(engine.make_request, f"together{i}", random_prompt(20 + i, seed=60 + i)))
    assert engine.step() == [] and set(engine.pop_failures()) == {f"together{i}" for i in range(3)}
    assert engine.num_steps == steps_before   # no client step ran in between
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0
    [again] = llm.generate([prompts[1]], GREEDY)
    assert again.outputs[0].token_ids == reference[1]


def test_a_failure_no_request_explains_is_the_engine_s_death(llm, prompts, monkeypatch):
    engine = llm.engine
    calls = []

    def broken(inputs):
        calls.append(inputs)
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.executor, "run", broken)
    # The lone request could be the cause, but the probe step (no client request) fails as well.
    engine.add(engine.make_request("alone", prompts[0], GREEDY))
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    assert len(calls) == 2   # the step and the probe
    assert engine.pop_failures() == {}   # the request is not blamed for the engine's death
    probe_tokens = calls[1].input_ids.tolist()
    assert probe_tokens != prompts[0] and len(probe_tokens) == len(engine._probe_ids)
    # A full batch fails the same way: its oldest request first, then the probe.
    engine.add(engine.make_request("a", prompts[1], GREEDY))
    engine.add(engine.make_request("b", prompts[2], GREEDY))
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    for request_id in ("a", "b"):
        engine.abort_request(request_id)
    monkeypatch.undo()
    assert engine.stats().kv_cache_usage == 0.0   # the probe gave its blocks back


async def test_async_engine_streams_others_on(llama_dir: Path, prompts, reference):
    engine = AsyncLLMEngine(EngineConfig(model=str(llama_dir), num_kv_blocks=256))
    real = engine.engine.make_request

    def make(request_id, prompt, params, stream=False):
        if request_id == "bad":
            request = poisoned(real, request_id, prompt)
            request.stream = stream
            return request
        return real(request_id, prompt, params, stream)

    engine.engine.make_request = make

    async def collect(prompt, request_id):
        return [out async for out in engine.generate(prompt, GREEDY, request_id)]

    try:
        tasks = [asyncio.create_task(collect(p, f"s{i}")) for i, p in enumerate(prompts)]
        await asyncio.sleep(0)
        bad = asyncio.create_task(collect(random_prompt(20, seed=5), "bad"))
        with pytest.raises(RequestFailedError):
            await asyncio.wait_for(bad, 60)
        streams = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert [s[-1].outputs[0].token_ids for s in streams] == reference
        assert not engine.is_dead
        engine.check_health()
        [*_, last] = await collect(prompts[0], "after")
        assert last.outputs[0].token_ids == reference[0]
    finally:
        await engine.shutdown()
    with pytest.raises(EngineDeadError):
        engine.check_health()
