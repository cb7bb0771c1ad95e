"""The asynchronous engine: streaming, cancellation, aborts, validation, a dying or stalling step."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from serving.config import EngineConfig
from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.errors import EngineDeadError, EngineStalledError, RequestTooLargeError
from serving.sampling_params import SamplingParams
from tests.engine.test_engine import hf_greedy, random_prompt
from tests.fixtures.checkpoints import hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
TIMEOUT = 30


@pytest.fixture(scope="module")
async def engine(llama_dir: Path):
    engine = AsyncLLMEngine(EngineConfig(model=str(llama_dir), num_kv_blocks=256,
                                         served_model_name="llama-test"))
    yield engine
    await engine.shutdown()


async def collect(engine: AsyncLLMEngine, prompt, params, request_id: str) -> list:
    return [out async for out in engine.generate(prompt, params, request_id)]


async def eventually(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_concurrent_streams_match_transformers(engine, llama_dir: Path):
    prompts = [random_prompt(n, seed=200 + n) for n in (7, 60, 130, 250)]
    hf = hf_model(llama_dir)
    expected = [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]
    streams = await asyncio.wait_for(asyncio.gather(
        *(collect(engine, p, GREEDY, f"s{i}") for i, p in enumerate(prompts))), TIMEOUT)
    for stream, want in zip(streams, expected):
        final = stream[-1]
        assert final.finished and not any(o.finished for o in stream[:-1]) and len(stream) > 1
        assert final.outputs[0].token_ids == want
        assert [t for o in stream for t in o.outputs[0].delta_token_ids] == want
        assert "".join(o.outputs[0].delta_text for o in stream) == final.outputs[0].text
        assert final.metrics.first_token_time <= final.metrics.finished_time
    assert engine.model_name == "llama-test" and engine.max_model_len == 1024
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.num_steps > 0


async def test_text_prompts_and_chat(engine):
    [*_, last] = await collect(engine, "Hello there", GREEDY, "text")
    assert last.prompt == "Hello there" and last.prompt_token_ids == engine.encode("Hello there")
    ids = engine.encode_chat([{"role": "user", "content": "Hi"}])
    assert engine.tokenizer.decode(ids) == "<s>[INST] Hi [/INST]"
    with pytest.raises(ValueError, match="role"):
        engine.encode_chat([{"role": "robot", "content": "Hi"}])


async def test_cancelled_consumer_frees_its_blocks(engine):
    free_before = engine.stats().num_free_blocks
    seen = asyncio.Event()

    async def consume():
        prompt = random_prompt(200, seed=1)
        async for _ in engine.generate(prompt, SamplingParams(max_tokens=500), "cancel-me"):
            seen.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(seen.wait(), TIMEOUT)
    assert engine.stats().num_free_blocks < free_before
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: engine.stats().num_free_blocks == free_before)
    assert engine.stats().num_running == 0


async def test_breaking_out_and_abort_free_blocks(engine):
    free_before = engine.stats().num_free_blocks
    stream = engine.generate(random_prompt(50, seed=2), SamplingParams(max_tokens=500), "break-me")
    async for _ in stream:
        break
    await stream.aclose()
    await eventually(lambda: engine.stats().num_free_blocks == free_before)

    outputs = []

    async def consume():
        prompt = random_prompt(50, seed=3)
        async for out in engine.generate(prompt, SamplingParams(max_tokens=500), "abort-me"):
            outputs.append(out)
            if len(outputs) == 2:
                engine.abort("abort-me")

    await asyncio.wait_for(consume(), TIMEOUT)                # the stream ends instead of hanging
    assert len(outputs) == 2 and not outputs[-1].finished
    await eventually(lambda: engine.stats().num_free_blocks == free_before)


async def test_invalid_requests_fail_before_any_output(engine):
    with pytest.raises(ValueError, match="prompt is empty"):
        await collect(engine, "", GREEDY, "empty")
    with pytest.raises(ValueError, match=r"300 tokens and max_tokens is 1000: 1300 exceeds .* 1024"):
        await collect(engine, random_prompt(300, seed=4), SamplingParams(max_tokens=1000), "long")
    first = engine.generate(random_prompt(20, seed=5), SamplingParams(max_tokens=200), "dup")
    await first.__anext__()
    with pytest.raises(ValueError, match="already in use"):
        await collect(engine, "x", GREEDY, "dup")
    await first.aclose()


async def test_too_large_stall_and_death(llama_dir: Path):
    engine = AsyncLLMEngine(EngineConfig(model=str(llama_dir), num_kv_blocks=20, stall_timeout_s=0.3))
    with pytest.raises(RequestTooLargeError, match="pool has 20 blocks"):
        await collect(engine, random_prompt(300, seed=6), GREEDY, "too-large")

    executor = engine.engine.executor
    real_run = executor.run
    release = threading.Event()

    def stalling_run(inputs):
        release.wait()
        return real_run(inputs)

    executor.run = stalling_run
    task = asyncio.create_task(collect(engine, random_prompt(10, seed=7), GREEDY, "stalled"))
    await asyncio.sleep(0.5)
    with pytest.raises(EngineStalledError, match="no step"):
        engine.check_health()
    release.set()
    assert (await asyncio.wait_for(task, TIMEOUT))[-1].finished
    engine.check_health()

    def failing_run(inputs):
        raise RuntimeError("boom")

    executor.run = failing_run
    results = await asyncio.wait_for(asyncio.gather(
        *(collect(engine, random_prompt(10 + i, seed=i), GREEDY, f"doomed-{i}") for i in range(3)),
        return_exceptions=True), TIMEOUT)
    assert all(isinstance(r, EngineDeadError) and isinstance(r.__cause__, RuntimeError) for r in results)
    assert "boom" in str(results[0])
    with pytest.raises(EngineDeadError):
        engine.check_health()
    with pytest.raises(EngineDeadError):
        await collect(engine, "hello", GREEDY, "after-death")
    await engine.shutdown()


async def test_shutdown_fails_in_flight_requests(llama_dir: Path):
    engine = AsyncLLMEngine(EngineConfig(model=str(llama_dir), num_kv_blocks=64))
    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate(random_prompt(10, seed=8), SamplingParams(max_tokens=500), "long"):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), TIMEOUT)
    await engine.shutdown()
    with pytest.raises(EngineDeadError, match="shut down"):
        await asyncio.wait_for(task, TIMEOUT)
    with pytest.raises(EngineDeadError, match="shut down"):
        await collect(engine, "hello", GREEDY, "after-shutdown")
