"""The `compile` option: pure decode steps run the model's forward through torch.compile (inductor) at
bucketed batch sizes (serving/engine/buckets.py), so each bucket is compiled once, at start, and never on
the request path; larger steps and steps with prefill tokens stay eager.

Attention stays eager inside the compiled forward (one graph break per layer): its paged kernels and
per-step plans are not traceable, and tracing them would specialise on every context length. Inductor
fuses what lies between (norms, residual adds, rotary, SwiGLU) around the matmuls. Compiled graphs are
cached on disk under the project's cache folder, so a restart recompiles from the cache.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from serving.engine.buckets import DecodeBuffers, PaddedDecode, batch_buckets, bucket_for
from serving.layers.attention import attention_layers
from serving.utils.cache import cache_dir
from serving.utils.context import AttentionContext

logger = logging.getLogger(__name__)


class CompiledDecode:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks: int, block_size: int,
                 scratch_block: int, device: torch.device):
        # Before the first compile: inductor reads its cache folder from the environment.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
        for layer in attention_layers(model):
            layer.forward = torch.compiler.disable(layer.forward)
        self.buckets = batch_buckets(max_num_seqs)
        self.buffers = DecodeBuffers(self.buckets[-1], max_blocks, block_size, scratch_block, device)
        self.model = torch.compile(model, dynamic=False)
        self.compile_seconds: dict[int, float] = {}
        self.steps = 0                   # steps that ran compiled
        self._compiles_at_warmup = 0

    def pad(self, input_ids: torch.Tensor, positions: torch.Tensor,
            ctx: AttentionContext) -> tuple[PaddedDecode, AttentionContext] | None:
        """The step padded to its bucket, with its attention context; None: the step runs eagerly."""
        num_seqs = len(ctx.host_seq_lens_k)
        bucket = bucket_for(num_seqs, self.buckets) if ctx.num_prefill_seqs == 0 else None
        if bucket is None:
            return None
        self.steps += 1
        return self._padded(bucket, input_ids, positions, ctx)

    def _padded(self, bucket: int, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: AttentionContext) -> tuple[PaddedDecode, AttentionContext]:
        num_seqs = len(ctx.host_seq_lens_k)
        step = self.buffers.fill(bucket, input_ids, positions, ctx.slot_mapping, ctx.seq_lens_k,
                                 ctx.block_tables)
        return step, AttentionContext(
            cu_seqlens_q=step.cu_seqlens_q, seq_lens_k=step.seq_lens_k, slot_mapping=step.slot_mapping,
            block_tables=step.block_tables, host_cu_seqlens_q=list(range(bucket + 1)),
            host_seq_lens_k=ctx.host_seq_lens_k + [1] * (bucket - num_seqs), num_prefill_seqs=0,
            num_prefill_tokens=0)

    def warm(self, run: Callable[[torch.Tensor, torch.Tensor, AttentionContext], object]) -> None:
        """Compile every bucket now, on steps of padding rows only (they touch just the scratch block)."""
        empty = torch.zeros(0, dtype=torch.int64, device=self.buffers.input_ids.device)
        for i, bucket in enumerate(self.buckets):
            ctx = AttentionContext(
                cu_seqlens_q=torch.zeros(1, dtype=torch.int32, device=empty.device),
                seq_lens_k=empty.int(), slot_mapping=empty,
                block_tables=torch.zeros(0, 1, dtype=torch.int32, device=empty.device),
                host_cu_seqlens_q=[0], host_seq_lens_k=[], num_prefill_seqs=0, num_prefill_tokens=0)
            step, padded_ctx = self._padded(bucket, empty, empty, ctx)
            start = time.perf_counter()
            run(step.input_ids, step.positions, padded_ctx)
            self.compile_seconds[bucket] = time.perf_counter() - start
            logger.info("compiled decode bucket %d (%d/%d) in %.1f s", bucket, i + 1, len(self.buckets),
                        self.compile_seconds[bucket])
        self._compiles_at_warmup = self.compiled_frames()

    @staticmethod
    def compiled_frames() -> int:
        """Frames dynamo has compiled in this process (each bucket compiles one per graph-broken piece)."""
        from torch._dynamo.utils import counters

        return counters["frames"]["ok"]

    @property
    def recompiles_since_warmup(self) -> int:
        return self.compiled_frames() - self._compiles_at_warmup
