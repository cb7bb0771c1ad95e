"""CUDA graphs for decode: each batch bucket's forward (serving/engine/buckets.py) is captured once, at start,
and every pure decode step of a bucket replays it on the static buffers, saving the per-kernel launch cost
that dominates small-batch decode. Steps with prefill tokens or beyond the largest bucket run eagerly.

A replay re-runs the captured kernels only: no Python, so every host-side value of the capture is frozen.
Hence graphs only for a graph-safe attention backend (`AttentionBackend.graph_safe`: it reads the step's
lengths and block tables from device tensors), whose plan is captured for the longest context a step can have
(max_model_len, as vLLM captures flash-attn). The model's forward has no host sync (`.item()`, `.tolist()`,
a pageable copy), which a capture would refuse. Buckets are captured largest first into one memory pool, so
the smaller ones reuse the largest one's activations. Tensor-parallel ranks capture the same buckets in the
same order at start and replay in lockstep (each calls ModelRunner.run with the same step); NCCL collectives
may be captured.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch

from serving.engine.buckets import BucketedDecode, PaddedDecode, StepForward, padded_context
from serving.layers.attention_types import AttentionBackend, KVLayout

logger = logging.getLogger(__name__)


class Graph(Protocol):
    def replay(self) -> None: ...


class GraphApi(Protocol):
    """The part of torch.cuda this module uses (a test replaces it: graphs need a GPU)."""

    def available(self, device: torch.device) -> bool: ...

    def pool(self) -> Any: ...

    def capture(self, fn: Callable[[], torch.Tensor], pool: Any,
                device: torch.device) -> tuple[Graph, torch.Tensor]:
        """The graph of one call of `fn` and its static output."""


class CudaGraphApi:
    warmup_runs = 2

    def available(self, device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.is_available()

    def pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], torch.Tensor], pool: Any,
                device: torch.device) -> tuple[Graph, torch.Tensor]:
        with torch.cuda.device(device):
            # PyTorch's recipe: warm up on a side stream first, so lazy initialisation (cuBLAS handles and
            # workspaces, NCCL communicators, a compiled forward's compilation) happens outside the capture.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(self.warmup_runs):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: only this thread's unsafe calls break the capture, not another thread's (NCCL's
            # watchdog queries the events of the warm-up's collectives; Ray's threads).
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = fn()
        return graph, out


API: GraphApi = CudaGraphApi()


def choose(enabled: bool, device: torch.device, backend: AttentionBackend, api: GraphApi) -> tuple[bool, str]:
    """Whether decode steps replay CUDA graphs here, and why (or why not)."""
    if not enabled:
        return False, "cuda_graphs=False"
    if not api.available(device):
        return False, f"CUDA graphs need a CUDA device (the model is on {device})"
    if not backend.graph_safe:
        return False, (f"the {backend.name} attention backend is not graph-safe: its decode plan depends on "
                       "host-side context lengths, which every replay would reuse from the capture")
    return True, f"{backend.name} attention is graph-safe"


class GraphDecode(BucketedDecode):
    path = "cuda_graphs"
    prepared = "captured the CUDA graph of"
    largest_first = True

    def __init__(self, forward: StepForward, layout: KVLayout, max_num_seqs: int, scratch_block: int,
                 api: GraphApi):
        super().__init__(forward, layout, max_num_seqs, scratch_block)
        self.api = api
        self._pool = api.pool()
        self._graphs: dict[int, tuple[Graph, torch.Tensor]] = {}

    @property
    def captures(self) -> int:
        return len(self._graphs)

    def _prepare(self, step: PaddedDecode) -> None:
        # Host-side lengths at their bound: every replay plans as the capture did.
        ctx = padded_context(step, [self.layout.max_model_len] * step.bucket)
        try:
            self._graphs[step.bucket] = self.api.capture(
                lambda: self.forward(step.input_ids, step.positions, ctx), self._pool, self.layout.device)
        except RuntimeError as error:
            raise RuntimeError(f"capturing the decode CUDA graph of batch bucket {step.bucket} failed ({error}); "
                               "cuda_graphs=False (--no-cuda-graphs) runs decode eagerly") from error

    def _run(self, step: PaddedDecode, host_seq_lens_k: list[int]) -> torch.Tensor:
        graph, out = self._graphs[step.bucket]
        graph.replay()
        return out
