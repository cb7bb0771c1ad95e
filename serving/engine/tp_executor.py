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
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
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
# How often a step that has not finished checks that every follower still runs. Most steps finish
# before the first check, so a step pays no liveness probe (a Ray round trip for actor followers).
_STEP_LIVENESS_POLL_S = 0.05


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
            step = self._step_thread.submit(self._broadcast_and_run, inputs)
            return _wait_for_step(step, self.followers)

    def _broadcast_and_run(self, inputs: StepInputs) -> SamplerOutput:
        dist.broadcast_object_list([inputs], src=0, group=get_cpu_group())
        self._last_message = time.monotonic()
        # On the host here, so that the wait for the device is part of the step the driver watches.
        return self.runner.run(inputs).cpu()

    def check_health(self) -> None:
        reason = self.followers.dead_reason()
        if reason is not None:
            raise EngineDeadError(reason)

    def shutdown(self) -> None:
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.followers.dead_reason() is None:
                try:
                    dist.broadcast_object_list([STOP], src=0, group=get_cpu_group())
                except RuntimeError:
                    logger.warning("tensor-parallel followers did not take the stop message")
            self.followers.join(_WORKER_JOIN_TIMEOUT_S)
            self._step_thread.shutdown(wait=False)
            destroy_tensor_parallel()


def _wait_for_step(step: concurrent.futures.Future, followers: Followers) -> SamplerOutput:
    """The step's result; EngineDeadError as soon as it fails or a follower is seen dead while it runs.

    Over gloo a dead peer's closed sockets fail the collective at once; over NCCL the collective would wait
    for the peer until the watchdog aborts the process. So the driver does not trust the collective to
    fail: it polls liveness, and on a death it aborts the group (which releases the step's thread) and
    reports the engine dead.
    """
    while True:
        try:
            return step.result(timeout=_STEP_LIVENESS_POLL_S)
        except concurrent.futures.TimeoutError:
            reason = followers.dead_reason()
            if reason is None:
                continue
            _abort_group()
            raise EngineDeadError(f"{reason} during a step") from None
        except RuntimeError as error:
            raise EngineDeadError(followers.dead_reason() or f"a tensor-parallel collective failed: "
                                  f"{error}") from error


def _abort_group() -> None:
    """Abort the process group's pending collectives (NCCL), so the blocked step thread returns."""
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception as error:  # noqa: BLE001 - best effort: the engine is dead either way
        logger.warning("could not abort the tensor-parallel group: %s", error)
