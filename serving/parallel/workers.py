"""Tensor-parallel worker processes: ranks 1..N-1, which follow rank 0 (the engine's process, whose side is
serving/engine/tp_executor.py).

Every rank runs the same forward on its shard of each step the driver broadcasts over the gloo group; the
row-parallel all-reduces and the vocab all-gather make every rank's logits whole. This module knows nothing
of the engine: a follower builds its step runner with the factory in its `WorkerSpec` (the engine passes
its ModelRunner class), so imports point one way, engine -> parallel.

Followers are local processes (spawned) or Ray actors in the replica's placement group; how the driver starts,
watches and stops them is told in serving/engine/tp_executor.py.

A follower whose step raises stays in its loop: it reports the failure (`StepFailures`) and waits for the
driver's verdict before it takes part in any collective again: go on (every rank failed the step the same
way, fault isolation re-runs it in parts) or stop (it failed alone: the group cannot be trusted).
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from serving.config import EngineConfig
from serving.parallel.state import destroy_tensor_parallel, get_cpu_group, init_tensor_parallel
from serving.utils.device import ALL_GPUS_VISIBLE_ENV, ray_cuda_index, resolve_device

logger = logging.getLogger(__name__)

FOLLOWER_NAME_PREFIX = "mosaic-tp-follower-"
# Broadcast by an idle driver so the followers' wait for the next step never reaches the collective timeout.
KEEPALIVE = "keepalive"
# Broadcast by the driver to stop its followers.
STOP = None


# Keys of StepFailures on the rendezvous store (outside the process group's own prefix).
_FAILURE_COUNT_KEY = "mosaic/step-failures"
_RESUME, _GIVE_UP = b"resume", b"stop"


class StepRunner(Protocol):
    def run(self, inputs: Any) -> Any:
        """Run one step's forward on this rank's shard (the driver broadcast `inputs`)."""


# (config, model path, max_model_len, agree) -> a rank's runner; `agree` turns the rank's own KV-pool size
# into the one every rank uses (a collective: every rank calls it once, at the same point of start-up).
RunnerFactory = Callable[[EngineConfig, Path, int, Callable[[int], int]], StepRunner]


def check_in_key(rank: int) -> str:
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
    make_runner: RunnerFactory


class StepFailures:
    """Failed steps, out of band on the group's rendezvous store; a step that runs sends nothing, so the
    steps' hot path has no reply. A follower reports a step it failed, then waits for the driver's verdict;
    the driver reads the reports while it waits for a step (serving/engine/tp_executor.py, `_wait_for_step`)."""

    def __init__(self, store: dist.Store, world_size: int):
        self.store = store
        self.follower_ranks = range(1, world_size)
        self._num_read = 0   # the driver's: reports read so far

    # ---- a follower

    def report(self, rank: int, step: int, error: Exception) -> None:
        self.store.set(_failed_key(rank), f"{step}\n{type(error).__name__}: {str(error)[:200]}")
        self.store.add(_FAILURE_COUNT_KEY, 1)   # after the report: a driver that sees the count finds it

    def await_verdict(self, rank: int, timeout_s: float) -> bool:
        """True: go on with the next message; False: stop. Raises when no verdict comes within `timeout_s`."""
        key = _verdict_key(rank)
        self.store.wait([key], timedelta(seconds=timeout_s))
        verdict = self.store.get(key)
        self.store.delete_key(key)
        return verdict == _RESUME

    # ---- the driver

    def collect(self) -> dict[int, tuple[int, str]]:
        """The reports not read yet: rank -> (step number, error). One store round trip when there are none."""
        if self.store.add(_FAILURE_COUNT_KEY, 0) == self._num_read:
            return {}
        reports = {}
        for rank in self.follower_ranks:
            key = _failed_key(rank)
            if self.store.check([key]):
                step, _, error = self.store.get(key).decode().partition("\n")
                self.store.delete_key(key)
                reports[rank] = (int(step), error)
        self._num_read += len(reports)
        return reports

    def answer(self, ranks: Iterable[int], resume: bool) -> None:
        for rank in ranks:
            self.store.set(_verdict_key(rank), _RESUME if resume else _GIVE_UP)


def _failed_key(rank: int) -> str:
    return f"mosaic/step-failed/{rank}"


def _verdict_key(rank: int) -> str:
    return f"mosaic/step-verdict/{rank}"


def agree_on_min(value: int) -> int:
    """The smallest of every rank's `value` (a collective over the gloo group)."""
    agreed = torch.tensor([value])
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=get_cpu_group())
    return int(agreed)


def rank_device(config: EngineConfig, device_index: int) -> torch.device:
    device = resolve_device(config.device)
    return torch.device("cuda", device_index) if device.type == "cuda" else device


def follower_main(rank: int, spec: WorkerSpec, device_index: int) -> None:
    """A follower rank: join the group, load its shard, then run every step the driver broadcasts."""
    device = rank_device(spec.config, device_index)
    store = rendezvous_store(spec, rank)
    store.set(check_in_key(rank), "1")
    init_tensor_parallel(rank, spec.config.tensor_parallel_size, spec.init_method, device,
                         spec.config.tp_timeout_s, store)
    try:
        runner = spec.make_runner(dataclasses.replace(spec.config, device=str(device)), spec.model_path,
                                  spec.max_model_len, agree_on_min)
        group = get_cpu_group()
        failures = StepFailures(store, spec.config.tensor_parallel_size)
        step = 0   # steps run, counted like the driver counts the steps it broadcasts
        while True:
            message: list[Any] = [STOP]
            dist.broadcast_object_list(message, src=0, group=group)
            if message[0] is STOP:
                return
            if message[0] == KEEPALIVE:
                continue
            step += 1
            try:
                runner.run(message[0])
            except Exception as error:  # noqa: BLE001 - reported; the driver decides what follows
                logger.warning("tensor-parallel rank %d: step %d failed (%s); waiting for the driver's verdict",
                               rank, step, type(error).__name__)
                failures.report(rank, step, error)
                if not failures.await_verdict(rank, spec.config.tp_timeout_s):
                    return
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
        # The bundle reserves each rank's CPUs; the follower itself claims only its GPU, and sees the node's
        # others like the driver rank does (ALL_GPUS_VISIBLE_ENV).
        actor_cls = ray.remote(num_cpus=0, num_gpus=1 if gpu else 0,
                               runtime_env={"env_vars": ALL_GPUS_VISIBLE_ENV} if gpu else None)(_FollowerActor)
        self.actors, self.runs = [], []
        driver_id = ray.get_runtime_context().get_actor_id()
        for rank in range(1, spec.config.tensor_parallel_size):
            strategy = (PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
                        if group is not None else "DEFAULT")
            # Named after the driver, so operators (and tests) can find a replica's followers.
            actor = actor_cls.options(scheduling_strategy=strategy,
                                      name=f"{FOLLOWER_NAME_PREFIX}{driver_id}-rank{rank}").remote()
            self.actors.append(actor)
            self.runs.append(actor.run.remote(rank, spec, None))

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
    def run(self, rank: int, spec: WorkerSpec, device_index: int | None) -> None:
        """`device_index` None: the GPU Ray assigned to this actor (or none, on CPU)."""
        follower_main(rank, spec, (ray_cuda_index() or 0) if device_index is None else device_index)


def free_tcp_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def ray_address() -> str:
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


def inside_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except ImportError:
        return False
