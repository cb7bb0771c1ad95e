"""The engine's executor seam: what runs a scheduled step on the model, on one process or on a
tensor-parallel group.

Imports point one way: the engine holds an `Executor`; the executors hold the `ModelRunner` (model, KV cache,
attention backend, sampler); the tensor-parallel one drives worker processes (serving/parallel/), which
import nothing from the engine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from serving.config import EngineConfig
from serving.engine.model_runner import ModelRunner, StepInputs, StepPlan
from serving.engine.scheduler import SchedulerOutput
from serving.engine.tp_executor import TensorParallelExecutor
from serving.layers.sampler import SamplerOutput


class Executor(Protocol):
    runner: ModelRunner     # the driver's runner (rank 0's shard): model, KV pool, attention backend
    num_kv_blocks: int      # KV-cache blocks every rank holds
    vocab_size: int

    def prepare(self, batch: SchedulerOutput) -> tuple[StepInputs, StepPlan]:
        """Host-side inputs of one step, and which sequences its outputs belong to."""

    def run(self, inputs: StepInputs) -> SamplerOutput:
        """Execute one step; the output may stay on the device until the caller reads it (`.cpu()`)."""

    def check_health(self) -> None:
        """Raise EngineDeadError when a part of the executor (a tensor-parallel rank) is gone."""

    def shutdown(self) -> None:
        """Release what the executor started (worker processes, process groups)."""


class SingleProcessExecutor:
    """The model on this process: nothing else to watch or stop."""

    def __init__(self, config: EngineConfig, model_path: Path, max_model_len: int):
        self.runner = ModelRunner(config, model_path, max_model_len)
        self.num_kv_blocks = self.runner.num_kv_blocks
        self.vocab_size = self.runner.vocab_size

    def prepare(self, batch: SchedulerOutput) -> tuple[StepInputs, StepPlan]:
        return self.runner.prepare(batch)

    def run(self, inputs: StepInputs) -> SamplerOutput:
        return self.runner.run(inputs)

    def check_health(self) -> None:
        """A single process has no part that could be lost on its own."""

    def shutdown(self) -> None:
        """The model's tensors go with the executor."""


def make_executor(config: EngineConfig, model_path: Path, max_model_len: int) -> Executor:
    if config.tensor_parallel_size == 1:
        return SingleProcessExecutor(config, model_path, max_model_len)
    return TensorParallelExecutor(config, model_path, max_model_len)
