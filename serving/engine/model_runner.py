"""Runs one engine step on the model: flat variable-length batch in, sampled token ids out.

The work is split at a clean seam for tensor parallelism: `prepare` (driver only) turns the scheduler's
batch into `StepInputs`, plain host tensors and ints; `run` moves them to the device in one transfer per
dtype, sets the attention context, runs the model and samples. A tensor-parallel driver broadcasts the
same `StepInputs` to its workers, which each call `run`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from serving.config import EngineConfig
from serving.engine.scheduler import SchedulerOutput
from serving.engine.sequence import Sequence
from serving.layers.attention import Attention, select_backend
from serving.layers.sampler import Sampler, SamplerOutput, SamplingTensors
from serving.models.loader import load_model, resolve_dtype
from serving.parallel.state import get_cpu_group, get_tp_world_size
from serving.utils.context import AttentionContext, reset_context, set_context

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    input_ids: torch.Tensor                 # [T] int64: new tokens of all sequences, concatenated
    positions: torch.Tensor                 # [T] int64
    slot_mapping: torch.Tensor              # [T] int64: cache slot of each new token
    cu_seqlens_q: torch.Tensor              # [N + 1] int32
    seq_lens_k: torch.Tensor                # [N] int32
    block_tables: torch.Tensor              # [N, max_blocks] int32, padded with 0
    logits_indices: torch.Tensor | None     # [S] int64 tokens to sample from; None: every token
    max_seqlen_q: int
    max_seqlen_k: int
    num_prefill_seqs: int
    num_prefill_tokens: int
    sampling: SamplingTensors


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: Path, max_model_len: int):
        """One rank's model and KV cache; the layers shard themselves by the current TP group."""
        if config.tensor_parallel_size != get_tp_world_size():
            raise ValueError(
                f"tensor_parallel_size={config.tensor_parallel_size} but this process is in a "
                f"tensor-parallel group of {get_tp_world_size()}: a process drives one group at a time")
        self.config = config
        self.block_size = config.block_size
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            # Denormal floats (e.g. softmax tails) slow CPU arithmetic down several times over; flushing
            # them (magnitudes below 1e-38) to zero does not change results at float32 resolution.
            # A process-wide switch.
            torch.set_flush_denormal(True)
        self.model = load_model(model_path, self.dtype, self.device)
        self.vocab_size: int = self.model.config.vocab_size
        self.sampler = Sampler(self.device, config.seed)
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.attention_backend, backend = select_backend(config.attention_backend, self.device, self.dtype,
                                                         config.block_size)
        for layer in layers:
            layer.backend = backend
        self.num_kv_blocks = config.num_kv_blocks or self._default_num_kv_blocks(layers, max_model_len)
        if get_tp_world_size() > 1:
            # Every rank must hold the same block ids: agree on the smallest pool any rank can afford.
            agreed = torch.tensor([self.num_kv_blocks])
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=get_cpu_group())
            self.num_kv_blocks = int(agreed)
        # One allocation for every layer's keys and values; each layer gets views. Zeroed, because the
        # attention gathers whole blocks and masks the unused slots: garbage there could be NaN.
        self.kv_cache = torch.zeros(
            2, len(layers), self.num_kv_blocks, self.block_size, layers[0].num_kv_heads, layers[0].head_dim,
            dtype=self.dtype, device=self.device,
        )
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB) on %s", self.num_kv_blocks, self.block_size,
                    self.kv_cache.numel() * self.kv_cache.element_size() / 2**20, self.device)

    def check_health(self) -> None:
        """A single rank has no followers that could be lost (see TensorParallelExecutor)."""

    def shutdown(self) -> None:
        """Nothing outlives a single-rank runner but its tensors, which go with it."""

    def _default_num_kv_blocks(self, layers: list[Attention], max_model_len: int) -> int:
        """A share of free memory, but no more than max_num_seqs full-length sequences could ever use."""
        bytes_per_block = (2 * len(layers) * self.block_size * layers[0].num_kv_heads * layers[0].head_dim
                           * torch.finfo(self.dtype).bits // 8)
        if self.device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
        else:
            free_bytes = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        budget = int(free_bytes * self.config.kv_cache_memory_fraction) // bytes_per_block
        useful = self.config.max_num_seqs * -(-max_model_len // self.block_size)
        return max(1, min(budget, useful))

    def prepare(self, batch: SchedulerOutput) -> tuple[StepInputs, list[Sequence]]:
        """Host-side inputs for one step, and the sequences that sample a token (in output row order)."""
        bs = self.block_size
        input_ids: list[int] = []
        starts: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        for row, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + num_new])
            starts.append(start)
            tables.append(seq.block_table)
            # A sequence samples once its last token is in; a prompt chunk short of that does not.
            if start + num_new == seq.num_tokens:
                sample_rows.append(row)
                sampled.append(seq)
        num_seqs, num_tokens = len(starts), len(input_ids)
        max_blocks = max(map(len, tables))
        block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
        start_t = torch.tensor(starts)
        num_new_t = torch.tensor(batch.num_new_tokens)
        seq_lens = start_t + num_new_t
        cu_seqlens_q = torch.zeros(num_seqs + 1, dtype=torch.int64)
        torch.cumsum(num_new_t, 0, out=cu_seqlens_q[1:])
        if num_tokens == num_seqs:
            seq_index, positions = torch.arange(num_seqs), start_t
        else:
            seq_index = torch.repeat_interleave(torch.arange(num_seqs), num_new_t)
            positions = torch.arange(num_tokens) + (start_t - cu_seqlens_q[:-1])[seq_index]
        slot_mapping = block_tables[seq_index, positions // bs].long() * bs + positions % bs
        logits_indices = None
        if len(sample_rows) != num_tokens:
            logits_indices = (cu_seqlens_q[1:] - 1)[torch.tensor(sample_rows, dtype=torch.int64)]
        inputs = StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=positions,
            slot_mapping=slot_mapping,
            cu_seqlens_q=cu_seqlens_q.to(torch.int32),
            seq_lens_k=seq_lens.to(torch.int32),
            block_tables=block_tables,
            logits_indices=logits_indices,
            max_seqlen_q=max(batch.num_new_tokens),
            max_seqlen_k=int(seq_lens.max()),
            num_prefill_seqs=batch.num_prefill_seqs,
            num_prefill_tokens=sum(batch.num_new_tokens[:batch.num_prefill_seqs]),
            sampling=self._sampling_tensors(sampled),
        )
        return inputs, sampled

    def _sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        params = [seq.request.params for seq in seqs]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        num_logprobs = max(asked) if asked else None
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return SamplingTensors(num_logprobs=num_logprobs)
        chosen = [params[i] for i in rows]
        seeded = [j for j, i in enumerate(rows) if seqs[i].seed is not None]
        use_top_k = any(p.top_k > 0 for p in chosen)
        use_top_p = any(p.top_p < 1.0 for p in chosen)
        return SamplingTensors(
            sample_rows=torch.tensor(rows, dtype=torch.int64),
            temperature=torch.tensor([p.temperature for p in chosen], dtype=torch.float32),
            top_k=torch.tensor([p.top_k if p.top_k > 0 else self.vocab_size for p in chosen])
            if use_top_k else None,
            top_p=torch.tensor([p.top_p for p in chosen], dtype=torch.float32) if use_top_p else None,
            seeded_rows=torch.tensor(seeded, dtype=torch.int64) if seeded else None,
            seeds=torch.tensor([seqs[rows[j]].seed for j in seeded], dtype=torch.int64) if seeded else None,
            steps=torch.tensor([seqs[rows[j]].num_output_tokens for j in seeded], dtype=torch.int64)
            if seeded else None,
            all_sampled=len(rows) == len(seqs),
            num_logprobs=num_logprobs,
        )

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> SamplerOutput:
        """Execute one step; the returned tensors stay on the device until the caller reads them."""
        inputs = self._to_device(inputs)
        set_context(AttentionContext(
            cu_seqlens_q=inputs.cu_seqlens_q, seq_lens_k=inputs.seq_lens_k,
            max_seqlen_q=inputs.max_seqlen_q, max_seqlen_k=inputs.max_seqlen_k,
            slot_mapping=inputs.slot_mapping, block_tables=inputs.block_tables,
            is_decode=inputs.num_prefill_seqs == 0,
            num_prefill_seqs=inputs.num_prefill_seqs, num_prefill_tokens=inputs.num_prefill_tokens,
        ))
        try:
            hidden = self.model(inputs.input_ids, inputs.positions)
        finally:
            reset_context()
        if inputs.logits_indices is not None:
            hidden = hidden.index_select(0, inputs.logits_indices)
        return self.sampler(self.model.compute_logits(hidden), inputs.sampling)

    def _to_device(self, inputs: StepInputs) -> StepInputs:
        """Copy every host tensor of the step with one transfer per dtype (pinned, asynchronous)."""
        if self.device.type == "cpu":
            return inputs
        named = [(None, f.name, getattr(inputs, f.name)) for f in dataclasses.fields(inputs)]
        named += [("sampling", f.name, getattr(inputs.sampling, f.name))
                  for f in dataclasses.fields(inputs.sampling)]
        tensors = [(owner, name, value) for owner, name, value in named if isinstance(value, torch.Tensor)]
        moved: dict[tuple[str | None, str], torch.Tensor] = {}
        for dtype in {value.dtype for _, _, value in tensors}:
            group = [(owner, name, value) for owner, name, value in tensors if value.dtype == dtype]
            flat = torch.cat([value.reshape(-1) for _, _, value in group]).pin_memory()
            on_device = flat.to(self.device, non_blocking=True)
            for (owner, name, value), part in zip(group, on_device.split([v.numel() for _, _, v in group])):
                moved[(owner, name)] = part.view(value.shape)
        sampling = dataclasses.replace(
            inputs.sampling, **{name: t for (owner, name), t in moved.items() if owner == "sampling"})
        return dataclasses.replace(
            inputs, sampling=sampling, **{name: t for (owner, name), t in moved.items() if owner is None})
