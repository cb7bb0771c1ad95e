"""The KV budget on CUDA from a measured worst-case step (vLLM's profile_run), before the pool is sized.

Free memory after load is not what a step may use: a step's activations, the sampler's [rows, vocab]
tensors, the attention workspace, cuBLAS workspaces and NCCL buffers (made at the first collective) come on
top. So the runner runs one dummy step of the largest shape the scheduler can make (`worst_case_step`:
max_num_batched_tokens tokens, max_num_seqs sampled rows, every context at max_model_len) through every
memory-costly sampler path (`worst_case_sampling`), on a one-block scratch KV pool (`scratch_kv`), and
`measure` reads its peak. The pool then takes kv_cache_memory_fraction of what is left (`profiled_kv_pool`).
The dummy step has its own sampler and scratch blocks: no KV block, penalty slot, prefix-cache entry or
generator state of the runner is touched. On CPU nothing is profiled (the pool is calloc'd zero pages that
cost memory only as blocks are used).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from serving.capacity import KVPoolSize, default_kv_pool
from serving.engine import kv_cache
from serving.layers.attention import Attention
from serving.layers.attention_types import AttentionBackend, KVLayout
from serving.layers.sampler import SamplingTensors
from serving.limits import LIMITS


@dataclass(frozen=True)
class StepProfile:
    free_bytes: int         # device memory free after load, before the step
    allocated_bytes: int    # allocated by torch before the step: the weights (and small buffers)
    peak_bytes: int         # the step's allocations at their peak, above allocated_bytes
    retained_bytes: int     # of those, still allocated after it (a backend's workspace)
    outside_bytes: int      # what the step took outside torch's allocator (cuBLAS workspaces, NCCL buffers)

    @property
    def left_bytes(self) -> int:
        """Free memory once a worst-case step has run beside the weights: what the KV fraction applies to."""
        return max(0, self.free_bytes - self.peak_bytes - self.outside_bytes)

    def bound(self, kv_pool_bytes: int) -> int:
        """The most torch should ever hold allocated with a pool of `kv_pool_bytes`: weights, pool, a worst
        step (the gpu check's verdict on a full decode)."""
        return self.allocated_bytes + kv_pool_bytes + self.peak_bytes


def worst_case_step(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> tuple[list[int], list[int]]:
    """(cached tokens, new tokens) of each sequence of the largest step: max_num_batched_tokens tokens (as many
    as max_num_seqs sequences of max_model_len hold), as many sequences as can sample, every context ending at
    max_model_len (the longest gathers and masks). Prefill chunks first, as the scheduler orders them; the
    fewest of them that hold the tokens the single-token (decode) rows leave."""
    tokens = min(max_num_batched_tokens, max_num_seqs * max_model_len)
    seqs = min(max_num_seqs, tokens)
    # k prefill sequences of up to L tokens and seqs - k decodes: the smallest k with k * L + seqs - k >= tokens.
    prefills = 0 if tokens == seqs else -(-(tokens - seqs) // (max_model_len - 1))
    prefill_tokens = tokens - (seqs - prefills)
    chunks = [max_model_len] * (prefill_tokens // max_model_len)
    if prefill_tokens % max_model_len:
        chunks.append(prefill_tokens % max_model_len)
    num_new = chunks + [1] * (seqs - prefills)
    return [max_model_len - n for n in num_new], num_new


def worst_case_sampling(num_rows: int, num_slots: int, vocab_size: int, device: torch.device) -> SamplingTensors:
    """Every row through each sampler path that costs memory: temperature with top-k and top-p (a full sort),
    seeded noise, a grammar bitmask (allowing every token), all three penalties ([num_slots, vocab] counts)
    and the most top log-probabilities."""
    rows = torch.arange(num_rows, device=device)
    ones = torch.ones(num_rows, device=device)
    return SamplingTensors(
        sample_rows=rows, temperature=ones, top_k=torch.full_like(rows, vocab_size), top_p=ones * 0.9,
        seeded_rows=rows, seeds=rows, steps=rows, all_sampled=True, num_logprobs=LIMITS.logprobs,
        mask_rows=rows, token_bitmask=torch.full((num_rows, -(-vocab_size // 32)), -1, dtype=torch.int32,
                                                 device=device),
        penalty_rows=rows, presence=ones, frequency=ones, repetition=ones, num_penalty_slots=num_slots,
        penalty_slots=rows, reset_slots=rows)


@contextlib.contextmanager
def scratch_kv(layers: list[Attention], backend: AttentionBackend, layout: KVLayout) -> Iterator[None]:
    """The layers on a one-block KV pool for the block (every block table entry of the dummy step is 0),
    then back on the views they had."""
    saved = [(layer.backend, layer.k_cache, layer.v_cache) for layer in layers]
    kv_cache.attach(layers, backend, 1, layout)
    try:
        yield
    finally:
        for layer, (layer_backend, k, v) in zip(layers, saved):
            layer.backend, layer.k_cache, layer.v_cache = layer_backend, k, v


def measure(device: torch.device, step: Callable[[], None]) -> StepProfile:
    """Run `step` once and read what it took of `device`'s memory (CUDA only)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info(device)[0]
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    used = free_before - torch.cuda.mem_get_info(device)[0]
    grown = torch.cuda.memory_reserved(device) - reserved
    profile = StepProfile(free_before, allocated, torch.cuda.max_memory_allocated(device) - allocated,
                          torch.cuda.memory_allocated(device) - allocated, max(0, used - grown))
    torch.cuda.empty_cache()   # the step's cached blocks back to the device, for the pool's one allocation
    return profile


def profiled_kv_pool(profile: StepProfile, bytes_per_block: int, memory_fraction: float, max_num_seqs: int,
                     max_model_len: int, block_size: int, workspace_bytes: int) -> KVPoolSize:
    """default_kv_pool over the memory left after a worst-case step. The step ran the attention workspace
    (SDPA allocates it whole at its first gather), so the peak holds it; only what exceeds the peak is
    reserved again."""
    pool = default_kv_pool(profile.left_bytes, bytes_per_block, memory_fraction, max_num_seqs, max_model_len,
                           block_size, max(0, workspace_bytes - profile.peak_bytes))
    mib = 2**20
    return KVPoolSize(pool.blocks, f"{pool.reason}; free after a worst-case step: {profile.free_bytes / mib:.0f} "
                      f"MiB after load, less the step's peak {profile.peak_bytes / mib:.0f} MiB and "
                      f"{profile.outside_bytes / mib:.0f} MiB outside torch's allocator")
