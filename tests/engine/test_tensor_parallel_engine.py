"""The engine at tensor_parallel_size=2 (gloo follower process): same greedy tokens as TP=1 and
transformers; a dead follower marks the engine dead, also when it dies inside a step; shutdown leaves no orphan process;
how the driver tells a step every rank failed from one a rank failed alone (fault isolation:
tests/engine/test_tp_fault_isolation.py)."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from serving import LLM, SamplingParams
from serving.engine.errors import EngineDeadError
from serving.engine.tp_executor import _wait_for_step
from serving.parallel.workers import StepFailures
from tests.fixtures.checkpoints import hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [[1] + torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 40, 130)]


def followers() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("tp-rank-")]


# Penalties keep per-sequence token counts on every rank's device (serving/layers/penalty_counts.py): each
# rank must apply the same updates, step after step.
PENALIZED = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3,
                           frequency_penalty=0.5, presence_penalty=0.3)


def test_tp2_greedy_equals_tp1_and_transformers(llama_alt_dir: Path) -> None:
    batch = prompts(1000)
    tp1_llm = LLM(model=str(llama_alt_dir), num_kv_blocks=128)
    tp1 = [o.outputs[0].token_ids for o in tp1_llm.generate(batch, GREEDY)]
    tp1_penalized = [o.outputs[0].token_ids for o in tp1_llm.generate(batch, [GREEDY, PENALIZED, PENALIZED])]
    del tp1_llm
    tp2_llm = LLM(model=str(llama_alt_dir), tensor_parallel_size=2, num_kv_blocks=128)
    try:
        tp2 = [o.outputs[0].token_ids for o in tp2_llm.generate(batch, GREEDY)]
        assert [o.outputs[0].token_ids for o in tp2_llm.generate(batch, [GREEDY, PENALIZED, PENALIZED])] \
            == tp1_penalized
        assert tp1_penalized[1:] != tp1[1:]  # the penalties changed the tokens
        # One process drives one tensor-parallel group: a second engine of another size is refused.
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            LLM(model=str(llama_alt_dir), num_kv_blocks=16)
    finally:
        tp2_llm.shutdown()
    hf = hf_model(llama_alt_dir)
    with torch.inference_mode():
        reference = [hf.generate(torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                 pad_token_id=0)[0, len(p):].tolist() for p in batch]
    assert tp2 == tp1 == reference


def test_shutdown_leaves_no_follower(llama_dir: Path) -> None:
    llm = LLM(model=str(llama_dir), tensor_parallel_size=2, num_kv_blocks=64)
    pids = [p.pid for p in followers()]
    assert pids
    llm.shutdown()
    assert not any(p.pid in pids for p in followers())
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_killed_follower_marks_engine_dead(llama_dir: Path) -> None:
    llm = LLM(model=str(llama_dir), tensor_parallel_size=2, num_kv_blocks=64)
    try:
        assert llm.generate([[1, 5, 6]], GREEDY)[0].outputs[0].token_ids
        (follower,) = followers()
        os.kill(follower.pid, signal.SIGKILL)
        follower.join(10)
        with pytest.raises(EngineDeadError, match="tp-rank-1"):
            llm.engine.check_health()
        started = time.monotonic()
        with pytest.raises(EngineDeadError):
            llm.generate([[1, 5, 6]], GREEDY)
        assert time.monotonic() - started < 30
    finally:
        llm.shutdown()


def test_idle_group_outlives_the_collective_timeout(llama_dir: Path) -> None:
    """Followers wait for the next step in a collective that times out; an idle driver keeps them alive."""
    llm = LLM(model=str(llama_dir), tensor_parallel_size=2, num_kv_blocks=64, tp_timeout_s=5.0)
    try:
        first = llm.generate([[1, 5, 6]], GREEDY)[0].outputs[0].token_ids
        time.sleep(12.0)  # well past the 5 s timeout, with no step
        llm.engine.check_health()
        assert llm.generate([[1, 5, 6]], GREEDY)[0].outputs[0].token_ids == first
    finally:
        llm.shutdown()


def test_follower_dying_before_the_rendezvous_is_a_clear_error(llama_dir: Path, tmp_path: Path) -> None:
    """A script without a main guard under spawn: the follower re-runs it and dies while starting up."""
    import subprocess
    import sys

    script = tmp_path / "no_main_guard.py"
    script.write_text(f"from serving import LLM\nLLM(model={str(llama_dir)!r}, tensor_parallel_size=2, "
                      "num_kv_blocks=64)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode != 0
    assert "tp-rank-1 exited with code 1 before joining the tensor-parallel group" in done.stderr, done.stderr[-2000:]
    assert time.monotonic() - started < 240


def test_follower_killed_mid_step_is_noticed_within_seconds(llama_dir: Path) -> None:
    """The follower stops inside a step (the driver waits on it), then dies: the step raises at once, not
    after the 600 s collective timeout."""
    llm = LLM(model=str(llama_dir), tensor_parallel_size=2, num_kv_blocks=64)
    try:
        assert llm.generate([[1, 5, 6]], GREEDY)[0].outputs[0].token_ids
        (follower,) = followers()
        os.kill(follower.pid, signal.SIGSTOP)
        errors: list[BaseException] = []

        def generate() -> None:
            try:
                llm.generate([[1, 5, 6]], GREEDY)
            except BaseException as error:  # noqa: BLE001 - the test reads it below
                errors.append(error)

        thread = threading.Thread(target=generate)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive()  # waiting on the stopped follower
        os.kill(follower.pid, signal.SIGKILL)
        started = time.monotonic()
        thread.join(30)
        assert not thread.is_alive() and time.monotonic() - started < 10
        assert len(errors) == 1 and isinstance(errors[0], EngineDeadError), errors
    finally:
        llm.shutdown()


class _DiesAfter:
    """Followers that run for `seconds`, then report a dead rank."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def dead_reason(self) -> str | None:
        return "rank 1 died" if time.monotonic() > self.deadline else None

    def join(self, timeout: float) -> None:
        pass


def test_a_step_that_never_returns_fails_when_a_follower_dies() -> None:
    """What NCCL does with a dead peer (the collective never returns): the driver's wait still ends."""
    hung: concurrent.futures.Future = concurrent.futures.Future()
    started = time.monotonic()
    with pytest.raises(EngineDeadError, match="rank 1 died during a step"):
        _wait_for_step(hung, _DiesAfter(0.3), StepFailures(dist.HashStore(), 2), 1, 5.0)
    assert 0.3 <= time.monotonic() - started < 3
    done: concurrent.futures.Future = concurrent.futures.Future()
    done.set_result("output")
    assert _wait_for_step(done, _DiesAfter(0), StepFailures(dist.HashStore(), 2), 1, 5.0) == "output"


def _failed(error: Exception) -> concurrent.futures.Future:
    step: concurrent.futures.Future = concurrent.futures.Future()
    step.set_exception(error)
    return step


def test_a_step_failed_by_every_rank_is_the_engine_s_to_isolate() -> None:
    """The driver gets its own error back (not EngineDeadError) and the follower is told to go on."""
    failures = StepFailures(dist.HashStore(), 2)
    failures.report(1, 3, ValueError("bad id"))
    error = ValueError("bad id")
    with pytest.raises(ValueError) as raised:
        _wait_for_step(_failed(error), _DiesAfter(60), failures, 3, 5.0)
    assert raised.value is error
    assert failures.await_verdict(1, 1.0) is True


def test_a_step_failed_by_one_rank_is_the_engine_s_death() -> None:
    alive = _DiesAfter(60)
    # Rank 0 alone: the follower never reports; the wait ends after the grace.
    with pytest.raises(EngineDeadError, match=r"rank 0 failed step 1 \(ValueError: bad\) but rank 1 did not"):
        _wait_for_step(_failed(ValueError("bad")), alive, StepFailures(dist.HashStore(), 2), 1, 0.2)
    # Rank 1 alone, while rank 0's step waits for it (a collective that never returns).
    failures = StepFailures(dist.HashStore(), 2)
    failures.report(1, 4, RuntimeError("device fault"))
    hung: concurrent.futures.Future = concurrent.futures.Future()
    with pytest.raises(EngineDeadError, match=r"rank 1 failed step 4 alone \(RuntimeError: device fault\) while "
                                              "rank 0 waited for it in a collective"):
        _wait_for_step(hung, alive, failures, 4, 0.2)
    assert failures.await_verdict(1, 1.0) is False
    # Rank 1 alone in a step rank 0 ran: its report is seen while the next step waits.
    failures.report(1, 5, RuntimeError("late"))
    with pytest.raises(EngineDeadError, match=r"rank 1 failed step 5 alone \(RuntimeError: late\); rank 0 ran it"):
        _wait_for_step(hung, alive, failures, 6, 0.2)
    assert failures.await_verdict(1, 1.0) is False
