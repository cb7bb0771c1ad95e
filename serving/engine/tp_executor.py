"""The tensor-parallel executor: rank 0 (the engine's process) drives ranks 1..N-1 (serving/parallel/workers.py).

The driver schedules and prepares each step on the host, broadcasts the `StepInputs` over the gloo group,
and every rank runs the same forward on its shard; the driver's sampler gives the one answer. All of the
engine's collective code is here and in the workers: a single-process engine never touches torch.distributed.

Followers are local processes (offline `LLM`, or a replica outside Ray) or Ray actors placed in the
replica's placement group (the serving tier). Either way a follower that dies or stops answering makes
`check_health` raise, so the engine is marked dead and Ray replaces the replica.

Nothing waits unbounded. At start-up each follower checks in on the driver's rendezvous store before the
group forms; the driver polls for the check-ins and for its followers' liveness, so a follower that dies
first (say, a script without `if __name__ == "__main__":` under the spawn start method) is an error naming
its rank and exit code at once, and one that never shows up is an error after `tp_timeout_s`. Between steps
the followers wait in a collective, which gives up after `tp_timeout_s`: an idle driver sends a keepalive
message well before that, so an engine can sit idle for any time and still serve. During a step the driver
waits for the step's result while it polls its followers' liveness (see `_wait_for_step`): under NCCL a
dead peer does not fail a collective, it hangs it until the watchdog kills the process.

A step that raises on every rank (an error from the step's inputs) is the engine's to isolate, as on one
process: the followers report it and stay in their loop, and `run` raises the driver's own error. A rank that
fails a step alone, while the others may wait for it in a collective, makes the engine dead within a grace
(`_PEER_FAILURE_GRACE_S`, at most half of `tp_timeout_s`), naming the rank.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from serving.config import EngineConfig
from serving.engine.errors import EngineDeadError
from serving.engine.model_runner import ModelRunner, StepInputs, StepPlan
from serving.engine.scheduler import SchedulerOutput
from serving.layers.sampler import SamplerOutput
from serving.parallel.state import destroy_tensor_parallel, get_cpu_group, init_tensor_parallel
from serving.parallel.workers import (
    KEEPALIVE,
    STOP,
    Followers,
    LocalFollowers,
    RayFollowers,
    StepFailures,
    WorkerSpec,
    agree_on_min,
    check_in_key,
    free_tcp_address,
    inside_ray_actor,
    rank_device,
    ray_address,
    rendezvous_store,
)
from serving.utils.device import ray_cuda_index

logger = logging.getLogger(__name__)

_WORKER_JOIN_TIMEOUT_S = 10.0
_KEEPALIVES_PER_TIMEOUT = 4
_CHECK_IN_POLL_S = 0.05
# Starting a follower (spawn, import torch) takes seconds on a busy machine, whatever the collective timeout.
_MIN_CHECK_IN_S = 120.0
# How often a step that has not finished checks that every follower still runs and reads the failures they
# reported. Most steps finish before the first check, so a step pays no liveness probe (a Ray round trip for
# actor followers) and no store round trip.
_STEP_LIVENESS_POLL_S = 0.05
# Once one rank failed a step, how long the others have to fail it too: ranks run a step in lockstep through
# its collectives, so one that fails the same way gets there within about one layer's work. At most half of
# tp_timeout_s, so that a collective which timed out waiting for the failed rank comes too late to count.
_PEER_FAILURE_GRACE_S = 10.0


class TensorParallelExecutor:
    """The engine's executor for tensor_parallel_size > 1."""

    def __init__(self, config: EngineConfig, model_path: Path, max_model_len: int):
        use_ray = inside_ray_actor()
        spec = WorkerSpec(config, model_path, max_model_len, ray_address() if use_ray else free_tcp_address(),
                          ModelRunner)
        store = rendezvous_store(spec, 0)
        self.followers: Followers = RayFollowers(spec) if use_ray else LocalFollowers(spec)
        self._lock = threading.Lock()
        self._closed = False
        self._timeout_s = config.tp_timeout_s
        self._failures = StepFailures(store, config.tensor_parallel_size)
        self._num_steps = 0               # steps broadcast (the followers count them the same way)
        self._broken: str | None = None   # why the group cannot run steps any more
        try:
            self._await_check_ins(store, config.tensor_parallel_size)
            # In a Ray actor: the GPU Ray assigned to this replica; local processes: rank 0's is device 0.
            device = rank_device(config, (ray_cuda_index() or 0) if use_ray else 0)
            init_tensor_parallel(0, config.tensor_parallel_size, spec.init_method, device, config.tp_timeout_s,
                                 store)
            self.runner = ModelRunner(dataclasses.replace(config, device=str(device)), model_path, max_model_len,
                                      agree_on_min)
        except EngineDeadError:
            self.followers.join(0)
            raise
        except Exception as error:
            reason = self.followers.dead_reason()
            self.followers.join(0)
            raise EngineDeadError(reason or f"tensor-parallel start-up failed: {error}") from error
        self.num_kv_blocks = self.runner.num_kv_blocks
        self.vocab_size = self.runner.vocab_size
        # The step runs on its own thread so that the engine's thread can watch the followers meanwhile.
        self._step_thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="tp-step",
            initializer=torch.cuda.set_device if device.type == "cuda" else None,
            initargs=(device,) if device.type == "cuda" else ())
        self._last_message = time.monotonic()
        self._stop = threading.Event()
        threading.Thread(target=self._keep_alive, name="tp-keepalive", daemon=True).start()
        logger.info("tensor parallel: %d ranks (%s followers)", config.tensor_parallel_size,
                    "Ray actor" if use_ray else "process")

    def _await_check_ins(self, store: dist.TCPStore, world_size: int) -> None:
        """Wait until every follower checked in, failing at once when one dies first."""
        pending = list(range(1, world_size))
        limit = max(self._timeout_s, _MIN_CHECK_IN_S)
        deadline = time.monotonic() + limit
        while True:
            pending = [rank for rank in pending if not store.check([check_in_key(rank)])]
            if not pending:
                return
            reason = self.followers.dead_reason()
            if reason is not None:
                raise EngineDeadError(
                    f"{reason} before joining the tensor-parallel group (under the spawn start method, a "
                    "script that starts the engine needs an `if __name__ == \"__main__\":` guard)")
            if time.monotonic() > deadline:
                raise EngineDeadError(f"tensor-parallel ranks {pending} did not join within {limit:g}s")
            time.sleep(_CHECK_IN_POLL_S)

    def _keep_alive(self) -> None:
        interval = self._timeout_s / _KEEPALIVES_PER_TIMEOUT
        while not self._stop.wait(interval / 2):
            with self._lock:
                if self._broken is not None:
                    return   # the engine is dead and its group may be aborted: no follower to keep waiting
                if self._closed or time.monotonic() - self._last_message < interval:
                    continue
                try:
                    dist.broadcast_object_list([KEEPALIVE], src=0, group=get_cpu_group())
                except RuntimeError:
                    # A follower is gone: check_health (and the next step) report it.
                    logger.warning("tensor-parallel keepalive failed; a follower is gone")
                    return
                self._last_message = time.monotonic()

    def prepare(self, batch: SchedulerOutput) -> tuple[StepInputs, StepPlan]:
        return self.runner.prepare(batch)

    def run(self, inputs: StepInputs) -> SamplerOutput:
        """Broadcast the step, run rank 0's share and return its output on the host."""
        with self._lock:
            if self._closed:
                raise EngineDeadError("the tensor-parallel executor is shut down")
            if self._broken is not None:
                raise EngineDeadError(self._broken)
            self._num_steps += 1
            step = self._step_thread.submit(self._broadcast_and_run, inputs)
            grace_s = min(self._timeout_s / 2, _PEER_FAILURE_GRACE_S)
            try:
                return _wait_for_step(step, self.followers, self._failures, self._num_steps, grace_s)
            except EngineDeadError as error:
                self._broken = str(error)
                raise

    def _broadcast_and_run(self, inputs: StepInputs) -> SamplerOutput:
        dist.broadcast_object_list([inputs], src=0, group=get_cpu_group())
        self._last_message = time.monotonic()
        # On the host here, so that the wait for the device is part of the step the driver watches.
        return self.runner.run(inputs).cpu()

    def check_health(self) -> None:
        reason = self._broken or self.followers.dead_reason()
        if reason is not None:
            raise EngineDeadError(reason)

    def shutdown(self) -> None:
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # A broken group may have a follower inside a collective: the join below stops it.
            if self._broken is None and self.followers.dead_reason() is None:
                try:
                    dist.broadcast_object_list([STOP], src=0, group=get_cpu_group())
                except RuntimeError:
                    logger.warning("tensor-parallel followers did not take the stop message")
            self.followers.join(_WORKER_JOIN_TIMEOUT_S)
            self._step_thread.shutdown(wait=False)
            destroy_tensor_parallel()


def _wait_for_step(step: concurrent.futures.Future, followers: Followers, failures: StepFailures, number: int,
                   grace_s: float) -> SamplerOutput:
    """Step `number`'s result, or the error it raised on every rank (for the engine to isolate);
    EngineDeadError as soon as a follower is seen dead, or when a rank failed the step alone.

    Over gloo a dead peer's closed sockets fail the collective at once; over NCCL the collective would wait
    for the peer until the watchdog aborts the process. So the driver does not trust the collective to
    fail: it polls liveness, and on a death it aborts the group (which releases the step's thread) and
    reports the engine dead.

    Every rank runs the same code on the same inputs, so an error that comes from the inputs (a shape, a
    token id, a sampling value) is raised on every rank at the same point, after the same collectives: the
    group stays in step, and the followers, which reported it, go on when told. An error on one rank only is
    different: the others may wait for it in a collective it skipped, and its next collective would pair
    with that one. So once a rank failed, the others have `grace_s` to fail too; otherwise the followers that
    reported are told to stop and the engine is dead, the message naming the rank that failed alone.
    """
    failed: dict[int, str] = {}   # follower rank -> its error, for this step
    deadline = math.inf
    while not concurrent.futures.wait([step], timeout=_STEP_LIVENESS_POLL_S).done:
        _check_followers(followers, failures, failed, number)
        if failed:
            deadline = min(deadline, time.monotonic() + grace_s)
        if time.monotonic() > deadline:
            failures.answer(failed, resume=False)
            _abort_group()
            raise EngineDeadError(f"tensor-parallel rank {_ranks(failed)} failed step {number} alone "
                                  f"({_errors(failed)}) while rank 0 waited for it in a collective")
    error = step.exception()
    if error is None:
        if failed:
            failures.answer(failed, resume=False)
            raise EngineDeadError(f"tensor-parallel rank {_ranks(failed)} failed step {number} alone "
                                  f"({_errors(failed)}); rank 0 ran it")
        return step.result()
    own = f"{type(error).__name__}: {str(error)[:200]}"
    deadline = min(deadline, time.monotonic() + grace_s)
    while True:
        if len(failed) < len(failures.follower_ranks):
            _check_followers(followers, failures, failed, number, error)
        missing = [rank for rank in failures.follower_ranks if rank not in failed]
        if time.monotonic() > deadline:
            failures.answer(failed, resume=False)
            if missing:
                message = f"tensor-parallel rank 0 failed step {number} ({own}) but rank {_ranks(missing)} did not"
            else:   # rank 0's error came too late to be the same one (a collective that timed out waiting)
                message = (f"tensor-parallel rank {_ranks(failed)} failed step {number} alone ({_errors(failed)}) "
                           f"while rank 0 waited for it; rank 0 failed past the {grace_s:g}s grace ({own})")
            raise EngineDeadError(message) from error
        if not missing:
            failures.answer(failed, resume=True)
            raise error
        time.sleep(_STEP_LIVENESS_POLL_S)


def _check_followers(followers: Followers, failures: StepFailures, failed: dict[int, str], number: int,
                     error: BaseException | None = None) -> None:
    """Raise EngineDeadError if a follower died, or reported a failure of an earlier step (which rank 0 ran:
    the report came after that step's result); add this step's reports to `failed`."""
    reason = followers.dead_reason()
    if reason is not None:
        if error is None:
            _abort_group()
        raise EngineDeadError(f"{reason} during a step") from error
    for rank, (step, message) in failures.collect().items():
        failed[rank] = message
        if step != number:
            failures.answer(failed, resume=False)
            raise EngineDeadError(f"tensor-parallel rank {rank} failed step {step} alone ({message}); rank 0 ran it")


def _ranks(ranks: Iterable[int]) -> str:
    return ", ".join(map(str, ranks))


def _errors(failed: dict[int, str]) -> str:
    return "; ".join(dict.fromkeys(failed.values()))


def _abort_group() -> None:
    """Abort the process group's pending collectives (NCCL), so the blocked step thread returns."""
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception as error:  # noqa: BLE001 - best effort: the engine is dead either way
        logger.warning("could not abort the tensor-parallel group: %s", error)
