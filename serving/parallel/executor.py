"""Tensor-parallel execution: rank 0 (the engine's process) drives, ranks 1..N-1 follow.

The driver schedules and prepares each step on the host, broadcasts the `StepInputs` over the gloo group,
and every rank runs the same forward on its shard; the row-parallel all-reduces and the vocab all-gather
make every rank's logits whole, and the driver's sampler gives the one answer.

Followers are local processes (offline `LLM`, or a replica outside Ray) or Ray actors placed in the
replica's placement group (the serving tier). Either way a follower that dies or stops answering makes
`check_health` raise, so the engine is marked dead and Ray replaces the replica.

Nothing waits unbounded. At start-up each follower checks in on the driver's rendezvous store before the
group forms; the driver polls for the check-ins and for its followers' liveness, so a follower that dies
first (say, a script without `if __name__ == "__main__":` under the spawn start method) is an error naming
its rank and exit code at once, and one that never shows up is an error after `tp_timeout_s`. Between steps
the followers wait in a collective, which gives up after `tp_timeout_s`: an idle driver sends a keepalive
message well before that, so an engine can sit idle for any time and still serve.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from serving.config import EngineConfig
from serving.engine.errors import EngineDeadError
from serving.engine.model_runner import ModelRunner, StepInputs, StepPlan, resolve_device
from serving.engine.scheduler import SchedulerOutput
from serving.layers.sampler import SamplerOutput
from serving.parallel.state import destroy_tensor_parallel, get_cpu_group, init_tensor_parallel

logger = logging.getLogger(__name__)

_WORKER_JOIN_TIMEOUT_S = 10.0
FOLLOWER_NAME_PREFIX = "mosaic-tp-follower-"
# Broadcast by an idle driver so the followers' wait for the next step never reaches the collective timeout.
_KEEPALIVE = "keepalive"
_KEEPALIVES_PER_TIMEOUT = 4
_CHECK_IN_POLL_S = 0.05
# Starting a follower (spawn, import torch) takes seconds on a busy machine, whatever the collective timeout.
_MIN_CHECK_IN_S = 120.0


def _check_in_key(rank: int) -> str:
    return f"mosaic/checked-in/{rank}"


def rendezvous_store(spec: WorkerSpec, rank: int) -> dist.TCPStore:
    """The group's rendezvous store at `spec.init_method` (tcp://host:port): rank 0 serves it."""
    host, _, port = spec.init_method.removeprefix("tcp://").rpartition(":")
    return dist.TCPStore(host, int(port), spec.config.tensor_parallel_size, is_master=rank == 0,
                         timeout=timedelta(seconds=spec.config.tp_timeout_s), wait_for_workers=False)


@dataclass(frozen=True)
class WorkerSpec:
    config: EngineConfig
    model_path: Path
    max_model_len: int
    init_method: str


def rank_device(config: EngineConfig, device_index: int) -> torch.device:
    device = resolve_device(config.device)
    return torch.device("cuda", device_index) if device.type == "cuda" else device


def follower_main(rank: int, spec: WorkerSpec, device_index: int) -> None:
    """A follower rank: join the group, load its shard, then run every step the driver broadcasts."""
    device = rank_device(spec.config, device_index)
    store = rendezvous_store(spec, rank)
    store.set(_check_in_key(rank), "1")
    init_tensor_parallel(rank, spec.config.tensor_parallel_size, spec.init_method, device,
                         spec.config.tp_timeout_s, store)
    try:
        runner = ModelRunner(dataclasses.replace(spec.config, device=str(device)), spec.model_path,
                             spec.max_model_len)
        group = get_cpu_group()
        while True:
            message: list[StepInputs | str | None] = [None]
            dist.broadcast_object_list(message, src=0, group=group)
            if message[0] is None:
                return
            if message[0] == _KEEPALIVE:
                continue
            runner.run(message[0])
    finally:
        destroy_tensor_parallel()


class Followers(Protocol):
    def dead_reason(self) -> str | None:
        """None while every follower runs; else why one stopped."""

    def join(self, timeout: float) -> None: ...


class LocalFollowers:
    """Followers as spawned child processes (CUDA needs spawn, not fork)."""

    def __init__(self, spec: WorkerSpec):
        ctx = multiprocessing.get_context("spawn")
        self.processes = [
            ctx.Process(target=follower_main, args=(rank, spec, rank), name=f"tp-rank-{rank}", daemon=True)
            for rank in range(1, spec.config.tensor_parallel_size)
        ]
        for process in self.processes:
            process.start()

    def dead_reason(self) -> str | None:
        for process in self.processes:
            if not process.is_alive():
                return f"tensor-parallel worker {process.name} exited with code {process.exitcode}"
        return None

    def join(self, timeout: float) -> None:
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(timeout)


class RayFollowers:
    """Followers as Ray actors in the current placement group, one bundle (one GPU on GPUs) per rank."""

    def __init__(self, spec: WorkerSpec):
        import ray
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = get_current_placement_group()
        gpu = resolve_device(spec.config.device).type == "cuda"
        # The bundle reserves each rank's CPUs; the follower itself claims only its GPU.
        actor_cls = ray.remote(num_cpus=0, num_gpus=1 if gpu else 0)(_FollowerActor)
        self.actors, self.runs = [], []
        driver_id = ray.get_runtime_context().get_actor_id()
        for rank in range(1, spec.config.tensor_parallel_size):
            strategy = (PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
                        if group is not None else "DEFAULT")
            # Named after the driver, so operators (and tests) can find a replica's followers.
            actor = actor_cls.options(scheduling_strategy=strategy,
                                      name=f"{FOLLOWER_NAME_PREFIX}{driver_id}-rank{rank}").remote()
            self.actors.append(actor)
            # Ray gives each actor its own GPU as device 0.
            self.runs.append(actor.run.remote(rank, spec, 0))

    def dead_reason(self) -> str | None:
        import ray

        done, _ = ray.wait(self.runs, num_returns=1, timeout=0)
        if not done:
            return None
        rank = self.runs.index(done[0]) + 1
        try:
            ray.get(done[0])
            return f"tensor-parallel worker actor of rank {rank} stopped"
        except Exception as exc:  # noqa: BLE001 - any failure of the actor means the same: this rank is gone
            return f"tensor-parallel worker actor of rank {rank} died: {type(exc).__name__}"

    def join(self, timeout: float) -> None:
        import ray

        ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout)
        for actor in self.actors:
            ray.kill(actor)


class _FollowerActor:
    def run(self, rank: int, spec: WorkerSpec, device_index: int) -> None:
        follower_main(rank, spec, device_index)


def _free_tcp_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _ray_address() -> str:
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


def _inside_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except ImportError:
        return False


class TensorParallelExecutor:
    """The engine's model executor for tensor_parallel_size > 1, with ModelRunner's step surface."""

    def __init__(self, config: EngineConfig, model_path: Path, max_model_len: int):
        use_ray = _inside_ray_actor()
        spec = WorkerSpec(config, model_path, max_model_len,
                          _ray_address() if use_ray else _free_tcp_address())
        store = rendezvous_store(spec, 0)
        self.followers: Followers = RayFollowers(spec) if use_ray else LocalFollowers(spec)
        self._lock = threading.Lock()
        self._closed = False
        self._timeout_s = config.tp_timeout_s
        try:
            self._await_check_ins(store, config.tensor_parallel_size)
            device = rank_device(config, 0)
            init_tensor_parallel(0, config.tensor_parallel_size, spec.init_method, device, config.tp_timeout_s,
                                 store)
            self.runner = ModelRunner(dataclasses.replace(config, device=str(device)), model_path, max_model_len)
        except EngineDeadError:
            self.followers.join(0)
            raise
        except Exception as error:
            reason = self.followers.dead_reason()
            self.followers.join(0)
            raise EngineDeadError(reason or f"tensor-parallel start-up failed: {error}") from error
        self.model = self.runner.model  # rank 0's shard
        self.num_kv_blocks = self.runner.num_kv_blocks
        self.kv_pool = self.runner.kv_pool  # rank 0's; every rank holds the same blocks of its own heads
        self.vocab_size = self.runner.vocab_size
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
            pending = [rank for rank in pending if not store.check([_check_in_key(rank)])]
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
                    dist.broadcast_object_list([_KEEPALIVE], src=0, group=get_cpu_group())
                except RuntimeError:
                    # A follower is gone: check_health (and the next step) report it.
                    logger.warning("tensor-parallel keepalive failed; a follower is gone")
                    return
                self._last_message = time.monotonic()

    def prepare(self, batch: SchedulerOutput) -> tuple[StepInputs, StepPlan]:
        return self.runner.prepare(batch)

    def run(self, inputs: StepInputs) -> SamplerOutput:
        # No liveness probe per step (a Ray round trip in the decode loop): a dead follower closes its
        # sockets, so the step's first collective fails at once and is reported here as the engine's death.
        with self._lock:
            try:
                dist.broadcast_object_list([inputs], src=0, group=get_cpu_group())
                self._last_message = time.monotonic()
                return self.runner.run(inputs)
            except RuntimeError as error:
                raise EngineDeadError(self.followers.dead_reason() or f"a tensor-parallel collective failed: "
                                      f"{error}") from error

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
                    dist.broadcast_object_list([None], src=0, group=get_cpu_group())
                except RuntimeError:
                    logger.warning("tensor-parallel followers did not take the stop message")
            self.followers.join(_WORKER_JOIN_TIMEOUT_S)
            destroy_tensor_parallel()


def make_executor(config: EngineConfig, model_path: Path, max_model_len: int) -> ModelRunner | TensorParallelExecutor:
    if config.tensor_parallel_size == 1:
        return ModelRunner(config, model_path, max_model_len)
    return TensorParallelExecutor(config, model_path, max_model_len)
