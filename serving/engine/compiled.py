"""The `compile` option: pure decode steps run the model's forward through torch.compile (inductor) at
bucketed batch sizes (serving/engine/buckets.py), so each bucket is compiled once, at start, and never on
the request path; larger steps and steps with prefill tokens stay eager. On CUDA with graphs on, the
captured graphs (serving/engine/cuda_graphs.py) replay the compiled forward instead.

Attention stays eager inside the compiled forward (one graph break per layer): its paged kernels and
per-step plans are not traceable, and tracing them would specialise on every context length. Inductor
fuses what lies between (norms, residual adds, rotary, SwiGLU) around the matmuls. Compiled graphs are
cached on disk under the project's cache folder, so a restart recompiles from the cache.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from serving.engine.buckets import BucketedDecode, PaddedDecode, StepForward, padded_context
from serving.layers.attention import attention_layers
from serving.layers.attention_types import KVLayout
from serving.utils.cache import cache_dir

# How many ways one piece of the forward may be specialised per bucket (2 needed today; room for one more).
_SPECIALISATIONS_PER_BUCKET = 3


def compile_model(model: nn.Module, variants: int) -> nn.Module:
    """The model through torch.compile at static shapes, its attention layers left eager; `variants`: how
    many shapes (batch buckets) it is compiled for."""
    # Before the first compile: inductor reads its cache folder from the environment.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    # Each bucket recompiles every graph-broken piece, and a piece can be specialised more than one way per
    # bucket (the first decoder layer has no residual yet: 2 variants of its code). Past dynamo's per-code
    # limit (8 by default, below 2 x the 9 buckets of max_num_seqs=256) the remaining buckets run eagerly.
    # The limit counts per code object, which every model compiled in this process shares (the benchmark
    # compiles three): each one raises it by its own share.
    torch._dynamo.config.recompile_limit += _SPECIALISATIONS_PER_BUCKET * variants
    for layer in attention_layers(model):
        layer.forward = torch.compiler.disable(layer.forward)
    return torch.compile(model, dynamic=False)


class CompiledDecode(BucketedDecode):
    """`forward` runs a compiled model (compile_model); each bucket compiles on its first call, in `prepare`."""

    path = prepared = "compiled"

    def __init__(self, forward: StepForward, layout: KVLayout, max_num_seqs: int, scratch_block: int):
        super().__init__(forward, layout, max_num_seqs, scratch_block)
        self._compiles_at_warmup = 0
        self.frames_per_bucket: dict[int, int] = {}     # frames dynamo compiled for each bucket at start

    @property
    def compile_seconds(self) -> dict[int, float]:
        return self.prepare_seconds

    def prepare(self) -> None:
        super().prepare()
        self._compiles_at_warmup = self.compiled_frames()

    def _prepare(self, step: PaddedDecode) -> None:
        before = self.compiled_frames()
        self.forward(step.input_ids, step.positions, padded_context(step, [1] * step.bucket))
        self.frames_per_bucket[step.bucket] = self.compiled_frames() - before

    def _run(self, step: PaddedDecode, host_seq_lens_k: list[int]) -> torch.Tensor:
        return self.forward(step.input_ids, step.positions, padded_context(step, host_seq_lens_k))

    @staticmethod
    def compiled_frames() -> int:
        """Frames dynamo has compiled in this process (each bucket compiles one per graph-broken piece)."""
        from torch._dynamo.utils import counters

        return counters["frames"]["ok"]

    @property
    def recompiles_since_warmup(self) -> int:
        return self.compiled_frames() - self._compiles_at_warmup
