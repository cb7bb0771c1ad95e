"""Runs one engine step on the model: flat variable-length batch in, sampled token ids out.

The work is split at a clean seam for tensor parallelism: `prepare` (driver only) turns the scheduler's
batch into `StepInputs`, plain host tensors and ints; `run` moves them to the device in one transfer per
dtype, has the attention backend plan the step (once, from host-side lengths), runs the model
(`forward`, the one place a step calls the model) and samples.

Prompt log-probabilities: a prompt chunk of a sequence that asks for them also has its tokens' logits
computed (the hidden state at position p scores token p + 1), `_PROMPT_LOGITS_ROWS` rows at a time, so a
long chunk never holds full-vocabulary logits for all of its tokens at once. A tensor-parallel driver broadcasts the
same `StepInputs` to its workers, which each call `run`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from serving.capacity import KVPoolSize, default_kv_pool
from serving.config import EngineConfig
from serving.engine import cuda_graphs, kv_cache, kv_profile
from serving.engine.buckets import BucketedDecode, batch_buckets
from serving.engine.compiled import CompiledDecode, compile_model
from serving.engine.cuda_graphs import GraphDecode
from serving.engine.guided import fill_bitmask
from serving.engine.penalty_slots import PenaltySlots
from serving.engine.scheduler import SchedulerOutput
from serving.engine.sequence import Sequence
from serving.layers.attention import Attention, attention_layers, make_backend, select_backend
from serving.layers.attention_types import AttentionBackend
from serving.layers.sampler import Logprobs, Sampler, SamplerOutput, SamplingTensors, gather_logprobs
from serving.models.loader import load_model, resolve_dtype
from serving.models.native_decode import NATIVE_DECODE_MAX_ROWS
from serving.parallel.state import get_tp_world_size
from serving.utils.context import AttentionContext, reset_context, set_context
from serving.utils.device import resolve_device

logger = logging.getLogger(__name__)

# Prompt tokens whose full-vocabulary logits exist at one time (256 x 32k float32 = 32 MiB).
_PROMPT_LOGITS_ROWS = 256


@dataclass
class StepInputs:
    input_ids: torch.Tensor                 # [T] int64: new tokens of all sequences, concatenated
    positions: torch.Tensor                 # [T] int64
    slot_mapping: torch.Tensor              # [T] int64: cache slot of each new token
    cu_seqlens_q: torch.Tensor              # [N + 1] int32
    seq_lens_k: torch.Tensor                # [N] int32
    block_tables: torch.Tensor              # [N, max_blocks] int32, padded with 0
    logits_indices: torch.Tensor | None     # [S] int64 tokens to sample from; None: every token
    num_prefill_seqs: int
    num_prefill_tokens: int
    sampling: SamplingTensors
    prompt_logits_indices: torch.Tensor | None = None   # [P] int64 tokens whose logits score the next one
    prompt_target_ids: torch.Tensor | None = None       # [P] int64 the prompt tokens they score
    num_prompt_logprobs: int = 0                        # top logprobs per prompt token


@dataclass
class StepPlan:
    """What the engine needs to read a step's output back."""

    sampled: list[Sequence]                             # the sequences that sample, in output row order
    # Sequences scoring prompt tokens this step, with how many rows of prompt logprobs each, in row order.
    prompt_scored: list[tuple[Sequence, int]]


@dataclass
class StepLayout:
    """Where a step's new tokens go: the tensors attention reads, from host-side lists."""

    positions: torch.Tensor         # [T] int64
    slot_mapping: torch.Tensor      # [T] int64: cache slot of each new token
    cu_seqlens_q: torch.Tensor      # [N + 1] int32
    seq_lens_k: torch.Tensor        # [N] int32: context length after the step
    block_tables: torch.Tensor      # [N, max_blocks] int32, padded with 0


def step_layout(starts: list[int], num_new: list[int], tables: list[list[int]], block_size: int) -> StepLayout:
    """The layout of a step whose sequence i adds num_new[i] tokens after starts[i] cached ones, its blocks
    being tables[i] (the runner's `prepare`, and test harnesses that drive a model without the engine)."""
    num_seqs, num_tokens = len(starts), sum(num_new)
    max_blocks = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
    start_t = torch.tensor(starts)
    num_new_t = torch.tensor(num_new)
    cu_seqlens_q = torch.zeros(num_seqs + 1, dtype=torch.int64)
    torch.cumsum(num_new_t, 0, out=cu_seqlens_q[1:])
    if num_tokens == num_seqs:
        seq_index, positions = torch.arange(num_seqs), start_t
    else:
        seq_index = torch.repeat_interleave(torch.arange(num_seqs), num_new_t)
        positions = torch.arange(num_tokens) + (start_t - cu_seqlens_q[:-1])[seq_index]
    slot_mapping = block_tables[seq_index, positions // block_size].long() * block_size + positions % block_size
    return StepLayout(positions, slot_mapping, cu_seqlens_q.to(torch.int32), (start_t + num_new_t).to(torch.int32),
                      block_tables)


def forward(model: nn.Module, backend: AttentionBackend, input_ids: torch.Tensor, positions: torch.Tensor,
            ctx: AttentionContext, native: bool = False) -> torch.Tensor:
    """The model's hidden states for one step: the backend plans the step once, then every layer reads it.
    `native`: through the model's `native_forward` where it takes the step (eager steps only)."""
    ctx.plan = backend.plan(ctx)
    set_context(ctx)
    try:
        hidden = model.native_forward(input_ids, positions, ctx) if native else None
        return model(input_ids, positions) if hidden is None else hidden
    finally:
        reset_context()


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: Path, max_model_len: int,
                 agree_num_kv_blocks: Callable[[int], int] | None = None):
        """One rank's model and KV cache; the layers shard themselves by the current TP group.
        `agree_num_kv_blocks` (tensor parallelism) turns this rank's KV-pool size into the one every rank
        uses, so that every rank holds the same block ids."""
        if config.tensor_parallel_size != get_tp_world_size():
            raise ValueError(
                f"tensor_parallel_size={config.tensor_parallel_size} but this process is in a "
                f"tensor-parallel group of {get_tp_world_size()}: a process drives one group at a time")
        if config.block_size is None:
            raise ValueError("block_size=None reached the runner: the engine resolves it first (resolve_block_size)")
        self.config = config
        self.block_size = config.block_size
        # Slots in the sampler's device-side penalty counts (a tensor-parallel follower never prepares: its
        # commits are empty).
        self._penalty_slots = PenaltySlots(config.max_num_seqs)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            # Denormal floats (e.g. softmax tails) slow CPU arithmetic down several times over; flushing
            # them (magnitudes below 1e-38) to zero does not change results at float32 resolution.
            # A process-wide switch.
            torch.set_flush_denormal(True)
        self.model = load_model(model_path, self.dtype, self.device, config.quantization,
                                packed_weights=config.packed_weights and not config.compile)
        self.vocab_size: int = self.model.config.vocab_size
        self.sampler = Sampler(self.device, config.seed)
        layers = attention_layers(self.model)
        self.attention_backend = select_backend(config.attention_backend, self.device, self.dtype,
                                                config.block_size, config.kv_cache_dtype)
        self.kv_layout = layout = kv_cache.kv_layout(layers, self.block_size, self.dtype, self.device,
                                                     max_model_len, config.kv_cache_dtype)
        self.backend = make_backend(self.attention_backend, layout)
        self.step_profile: kv_profile.StepProfile | None = None   # CUDA: the worst-case step the pool is sized after
        pool = (KVPoolSize(config.num_kv_blocks, "num_kv_blocks") if config.num_kv_blocks
                else self._default_kv_pool(layers, max_model_len))
        self.num_kv_blocks = pool.blocks
        if agree_num_kv_blocks is not None:
            self.num_kv_blocks = agree_num_kv_blocks(self.num_kv_blocks)
        graphs, why = cuda_graphs.choose(config.cuda_graphs, self.device, self.backend, cuda_graphs.API)
        if self.device.type == "cuda" and not graphs:
            logger.info("decode runs without CUDA graphs: %s", why)
        # Bucketed decode pads its steps with rows that write one block no sequence owns: one past the pool.
        scratch_blocks = 1 if config.compile or graphs else 0
        self.kv_pool = kv_cache.attach(layers, self.backend, self.num_kv_blocks + scratch_blocks, layout)
        if self.device.type == "cpu" and self.model.bind_native_decode():
            logger.info("eager decode steps of up to %d rows run every layer in one native call",
                        NATIVE_DECODE_MAX_ROWS)
        logger.info("KV cache: %d blocks of %d tokens, %s, %d bytes per token: %.1f MiB on %s%s (%s%s); %s "
                    "attention workspace %.1f MiB", self.num_kv_blocks, self.block_size, config.kv_cache_dtype,
                    self.kv_pool.bytes_per_token, self.kv_pool.nbytes / 2**20, self.device,
                    ", resident only as blocks are first used" if self.device.type == "cpu" else "", pool.reason,
                    "" if self.num_kv_blocks == pool.blocks else "; the smallest of the tensor-parallel ranks",
                    self.attention_backend, self.backend.workspace_bytes / 2**20)
        # Pure decode steps within the batch buckets (None: every step eager): captured graphs, else compiled.
        self.decode: BucketedDecode | None = None
        if config.compile or graphs:
            model = (compile_model(self.model, len(batch_buckets(config.max_num_seqs))) if config.compile
                     else self.model)
            step_forward = lambda ids, pos, ctx: forward(model, self.backend, ids, pos, ctx)
            sizes = (step_forward, layout, config.max_num_seqs, self.num_kv_blocks)
            self.decode = GraphDecode(*sizes, cuda_graphs.API) if graphs else CompiledDecode(*sizes)
            if graphs:
                logger.info("decode replays CUDA graphs (%s)%s", why,
                            ", of the compiled forward" if config.compile else "")
            with torch.inference_mode():
                self.decode.prepare()

    def _default_kv_pool(self, layers: list[Attention], max_model_len: int) -> KVPoolSize:
        bytes_per_block = self.block_size * kv_cache.kv_bytes_per_token(
            len(layers), layers[0].num_kv_heads, layers[0].head_dim, self.config.kv_cache_dtype, self.dtype)
        sizes = (bytes_per_block, self.config.kv_cache_memory_fraction, self.config.max_num_seqs, max_model_len,
                 self.block_size, self.backend.workspace_bytes)
        if self.device.type == "cuda":
            self.step_profile = kv_profile.measure(self.device, lambda: self.dummy_step(layers, max_model_len))
            return kv_profile.profiled_kv_pool(self.step_profile, *sizes)
        return default_kv_pool(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), *sizes)

    @torch.inference_mode()
    def dummy_step(self, layers: list[Attention], max_model_len: int) -> None:
        """The largest step the scheduler can make, forward and sampler (kv_profile), on a scratch KV block
        with its own sampler: it leaves no state behind."""
        config = self.config
        starts, num_new = kv_profile.worst_case_step(config.max_num_batched_tokens, config.max_num_seqs,
                                                     max_model_len)
        layout = step_layout(starts, num_new, [[0] * -(-max_model_len // self.block_size)] * len(starts),
                             self.block_size)
        on_device = [t.to(self.device) for t in (layout.positions, layout.slot_mapping, layout.cu_seqlens_q,
                                                 layout.seq_lens_k, layout.block_tables)]
        positions, slot_mapping, cu_seqlens_q, seq_lens_k, block_tables = on_device
        prefills = sum(n > 1 for n in num_new)
        ctx = AttentionContext(cu_seqlens_q=cu_seqlens_q, seq_lens_k=seq_lens_k, slot_mapping=slot_mapping,
                               block_tables=block_tables, host_cu_seqlens_q=layout.cu_seqlens_q.tolist(),
                               host_seq_lens_k=layout.seq_lens_k.tolist(), num_prefill_seqs=prefills,
                               num_prefill_tokens=sum(num_new[:prefills]))
        with kv_profile.scratch_kv(layers, self.backend, self.kv_layout):
            hidden = forward(self.model, self.backend, positions % self.vocab_size, positions, ctx)
            logits = self.model.compute_logits(hidden.index_select(0, cu_seqlens_q[1:].long() - 1))
            sampling = kv_profile.worst_case_sampling(len(starts), config.max_num_seqs, self.vocab_size,
                                                      self.device)
            Sampler(self.device, config.seed)(logits, sampling)

    def prepare(self, batch: SchedulerOutput) -> tuple[StepInputs, StepPlan]:
        """Host-side inputs for one step, and which sequences its outputs belong to."""
        bs = self.block_size
        input_ids: list[int] = []
        starts: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        prompt_rows: list[int] = []
        prompt_targets: list[int] = []
        prompt_scored: list[tuple[Sequence, int]] = []
        for row, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            if seq.needs_prompt_logprobs:
                # Positions p in this chunk whose logits score prompt token p + 1, not scored before.
                first = max(start, len(seq.request.prompt_logprobs) - 1)
                last = min(start + num_new, seq.num_prompt_tokens - 1)
                if last > first:
                    offset = len(input_ids) - start
                    prompt_rows.extend(range(offset + first, offset + last))
                    prompt_targets.extend(seq.token_ids[first + 1:last + 1])
                    prompt_scored.append((seq, last - first))
            input_ids.extend(seq.token_ids[start:start + num_new])
            starts.append(start)
            tables.append(seq.block_table)
            # A sequence samples once its last token is in; a prompt chunk short of that does not.
            if start + num_new == seq.num_tokens:
                sample_rows.append(row)
                sampled.append(seq)
        layout = step_layout(starts, batch.num_new_tokens, tables, bs)
        logits_indices = None
        if len(sample_rows) != len(input_ids):
            logits_indices = (layout.cu_seqlens_q[1:].long() - 1)[torch.tensor(sample_rows, dtype=torch.int64)]
        inputs = StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=layout.positions,
            slot_mapping=layout.slot_mapping,
            cu_seqlens_q=layout.cu_seqlens_q,
            seq_lens_k=layout.seq_lens_k,
            block_tables=layout.block_tables,
            logits_indices=logits_indices,
            num_prefill_seqs=batch.num_prefill_seqs,
            num_prefill_tokens=sum(batch.num_new_tokens[:batch.num_prefill_seqs]),
            sampling=self._sampling_tensors(sampled),
        )
        if prompt_scored:
            inputs.prompt_logits_indices = torch.tensor(prompt_rows, dtype=torch.int64)
            inputs.prompt_target_ids = torch.tensor(prompt_targets, dtype=torch.int64)
            inputs.num_prompt_logprobs = max(seq.request.params.prompt_logprobs for seq, _ in prompt_scored)
        return inputs, StepPlan(sampled, prompt_scored)

    def _sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        params = [seq.request.params for seq in seqs]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        processing = self._processing_tensors(seqs)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return SamplingTensors(num_logprobs=max(asked, default=None), **processing)
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
            num_logprobs=max(asked, default=None),
            **processing,
        )

    def _processing_tensors(self, seqs: list[Sequence]) -> dict[str, torch.Tensor | int]:
        """SamplingTensors fields for grammar masks, logit_bias, min_tokens and penalties (only those used)."""
        out: dict[str, torch.Tensor | int] = {}
        guided = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
        if guided:
            out["mask_rows"] = torch.tensor(guided, dtype=torch.int64)
            out["token_bitmask"] = fill_bitmask([seqs[i].grammar for i in guided], self.vocab_size)
        bias: list[tuple[int, int, float]] = []
        for i, seq in enumerate(seqs):
            params = seq.request.params
            if params.logit_bias:
                bias.extend((i, token, value) for token, value in params.logit_bias.items())
            if seq.num_output_tokens < params.min_tokens:
                bias.extend((i, token, float("-inf")) for token in seq.request.min_tokens_banned)
        if bias:
            rows, ids, values = zip(*bias)
            out["bias_rows"] = torch.tensor(rows, dtype=torch.int64)
            out["bias_ids"] = torch.tensor(ids, dtype=torch.int64)
            out["bias_values"] = torch.tensor(values, dtype=torch.float32)
        rows = [i for i, seq in enumerate(seqs) if seq.request.params.penalized]
        # Their token counts live on the device: only the tokens since the last step go up.
        out.update(self._penalty_slots.tensors([seqs[i] for i in rows]))
        if not rows:
            return out
        params = [seqs[i].request.params for i in rows]
        out["penalty_rows"] = torch.tensor(rows, dtype=torch.int64)
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            out["presence"] = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32)
            out["frequency"] = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32)
        if any(p.repetition_penalty != 1.0 for p in params):
            out["repetition"] = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32)
        return out

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> SamplerOutput:
        """Execute one step; the returned tensors stay on the device until the caller reads them."""
        # The attention plan's lengths, read on the host before the transfer (no device sync).
        host_cu, host_lens = inputs.cu_seqlens_q.tolist(), inputs.seq_lens_k.tolist()
        inputs = self._to_device(inputs)
        ctx = AttentionContext(
            cu_seqlens_q=inputs.cu_seqlens_q, seq_lens_k=inputs.seq_lens_k, slot_mapping=inputs.slot_mapping,
            block_tables=inputs.block_tables, host_cu_seqlens_q=host_cu, host_seq_lens_k=host_lens,
            num_prefill_seqs=inputs.num_prefill_seqs, num_prefill_tokens=inputs.num_prefill_tokens,
        )
        # The step's model forward: bucketed (compiled or a graph replay) where it applies, else eager.
        hidden = self.decode.run(inputs.input_ids, inputs.positions, ctx) if self.decode else None
        if hidden is None:
            hidden = forward(self.model, self.backend, inputs.input_ids, inputs.positions, ctx, native=True)
        prompt_logprobs = None
        if inputs.prompt_logits_indices is not None:
            prompt_logprobs = self._prompt_logprobs(hidden, inputs)
        if inputs.logits_indices is not None:
            hidden = hidden.index_select(0, inputs.logits_indices)
        out = self.sampler(self.model.compute_logits(hidden), inputs.sampling)
        self._penalty_slots.commit()
        out.prompt_logprobs = prompt_logprobs
        return out

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs) -> Logprobs:
        """Log-probabilities of the prompt tokens this step scores, `_PROMPT_LOGITS_ROWS` rows at a time."""
        parts = [
            gather_logprobs(self.model.compute_logits(hidden.index_select(0, rows)).log_softmax(dim=-1), targets,
                            inputs.num_prompt_logprobs)
            for rows, targets in zip(inputs.prompt_logits_indices.split(_PROMPT_LOGITS_ROWS),
                                     inputs.prompt_target_ids.split(_PROMPT_LOGITS_ROWS))
        ]
        k = inputs.num_prompt_logprobs
        return Logprobs(chosen=torch.cat([p.chosen for p in parts]),
                        top_ids=torch.cat([p.top_ids for p in parts]) if k else None,
                        top_logprobs=torch.cat([p.top_logprobs for p in parts]) if k else None)

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
