"""Property tests: whatever a caller passes, SamplingParams and LLMEngine.make_request either accept it or
raise ValueError naming a field, and whatever they accept, the engine runs without a step failing."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import LLM, SamplingParams
from serving.limits import LIMITS

FIELDS = ("n", "temperature", "top_p", "top_k", "max_tokens", "stop", "stop_token_ids", "ignore_eos", "seed",
          "logprobs")
# Around the bounds, plus what a careless or hostile caller sends.
NUMBERS = st.one_of(
    st.integers(min_value=-3, max_value=40), st.integers(), st.sampled_from([2**63 - 1, 2**63, 2**70, -(2**70)]),
    # No subnormals: the engine flushes them to zero process-wide (ModelRunner), which hypothesis cannot take.
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False), st.booleans(), st.none(),
)
TEXT = st.text(st.characters(codec=None), max_size=8) | st.sampled_from(["\ud800", "</s>", "x" * 300])
ANY = NUMBERS | TEXT | st.lists(NUMBERS | TEXT, max_size=20)
PROPERTY = settings(max_examples=300, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def sampling_kwargs():
    # Half plausible values (near and past the engine's own bounds: a 1000-token vocabulary, 256 positions),
    # half anything at all.
    plausible = st.fixed_dictionaries({}, optional={
        "n": st.integers(1, 4), "temperature": st.floats(0, 2, allow_subnormal=False),
        "top_p": st.floats(0.01, 1, allow_subnormal=False),
        "top_k": st.integers(-1, 1200), "max_tokens": st.integers(1, 300), "stop": st.lists(TEXT, max_size=3),
        "stop_token_ids": st.lists(st.integers(0, 1100), max_size=3), "seed": st.integers(0, 2**63 - 1),
        "logprobs": st.integers(0, 20), "ignore_eos": st.booleans(),
    })
    return plausible | st.dictionaries(st.sampled_from(FIELDS), ANY, max_size=6)


@PROPERTY
@given(sampling_kwargs())
def test_sampling_params_accept_or_name_the_field(kwargs):
    try:
        params = SamplingParams(**kwargs)
    except ValueError as exc:
        assert any(f"invalid {field}=" in str(exc) for field in FIELDS), str(exc)
        return
    assert 1 <= params.n <= LIMITS.n and 1 <= params.max_tokens <= LIMITS.max_tokens
    assert params.top_k == -1 or 1 <= params.top_k <= LIMITS.top_k
    assert len(params.stop) <= LIMITS.stop_strings and all(0 < len(s) <= LIMITS.stop_chars for s in params.stop)
    assert params.seed is None or 0 <= params.seed <= LIMITS.seed


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), num_kv_blocks=128, max_model_len=256)


ACCEPTED: list[str] = []

VALID_IDS = st.lists(st.integers(min_value=0, max_value=999), min_size=1, max_size=40)
PROMPTS = st.one_of(
    VALID_IDS, VALID_IDS, st.text(min_size=1, max_size=40), TEXT, st.text(max_size=40),
    st.lists(st.integers(min_value=-2, max_value=1100), max_size=30),
    st.lists(st.integers(), max_size=3), st.just([]), st.just(""), st.integers(), st.none(),
)


@settings(max_examples=150, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(prompt=PROMPTS, kwargs=sampling_kwargs())
def test_make_request_accepts_only_what_the_engine_can_run(llm, prompt, kwargs):
    engine = llm.engine
    try:
        params = SamplingParams(**kwargs)
        request = engine.make_request("fuzz", prompt, params, stream=True)
    except ValueError:
        return
    # What was accepted runs: a few steps of it, and no step may fail on its account.
    ACCEPTED.append(request.request_id)
    engine.add(request)
    try:
        for _ in range(3):
            if not engine.has_unfinished_requests():
                break
            engine.step()
            assert engine.pop_failures() == {}
    finally:
        engine.abort_request("fuzz")
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


def test_the_property_ran_real_requests():
    """Guard against a strategy that is refused every time: then the property above says nothing."""
    assert len(ACCEPTED) >= 20
