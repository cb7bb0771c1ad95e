"""The CUDA KV budget's worst-case step: its shape, the arithmetic over what it measured, and (run on CPU, where
the engine itself never profiles) that the dummy step leaves no state behind."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from serving import LLM, SamplingParams
from serving.capacity import default_kv_pool
from serving.engine.kv_profile import StepProfile, profiled_kv_pool, worst_case_step
from serving.layers.attention import attention_layers

GIB, MIB = 2**30, 2**20


def test_worst_case_step_fills_the_token_budget_with_as_many_sampled_rows_as_fit():
    for tokens, seqs, max_len in itertools.product((16, 96, 2048, 8192), (1, 3, 256), (16, 100, 4096)):
        starts, num_new = worst_case_step(tokens, seqs, max_len)
        assert sum(num_new) == min(tokens, seqs * max_len)
        assert len(num_new) == min(seqs, sum(num_new))                 # every sequence samples: the most rows
        assert all(s + n == max_len and s >= 0 for s, n in zip(starts, num_new))   # longest contexts
        assert num_new == sorted(num_new, reverse=True)                # prefill chunks first


def test_worst_case_step_example():
    starts, num_new = worst_case_step(2048, 256, 4096)
    assert num_new == [1793] + [1] * 255 and starts[:2] == [4096 - 1793, 4095]


def test_profiled_pool_takes_the_fraction_of_what_the_step_leaves():
    profile = StepProfile(free_bytes=10 * GIB, allocated_bytes=2 * GIB, peak_bytes=GIB, retained_bytes=256 * MIB,
                          outside_bytes=GIB // 2)
    assert profile.left_bytes == 17 * GIB // 2
    block = 2 * MIB
    sizes = {"bytes_per_block": block, "memory_fraction": 0.3, "max_num_seqs": 10_000, "max_model_len": 4096,
             "block_size": 16}
    # The workspace ran inside the step, so its peak holds it: nothing is reserved twice.
    pool = profiled_kv_pool(profile, workspace_bytes=256 * MIB, **sizes)
    assert pool.blocks == int(17 * GIB // 2 * 0.3) // block
    assert pool.blocks == default_kv_pool(profile.left_bytes, workspace_bytes=0, **sizes).blocks
    assert "peak 1024 MiB" in pool.reason and "512 MiB outside" in pool.reason
    # A workspace larger than the step's whole peak: the rest is reserved.
    assert profiled_kv_pool(profile, workspace_bytes=GIB + 64 * MIB, **sizes).blocks == \
        (int(17 * GIB // 2 * 0.3) - 64 * MIB) // block
    # A step that leaves nothing gives the one-block minimum, not a negative pool.
    starved = StepProfile(GIB, 0, 2 * GIB, 0, 0)
    assert starved.left_bytes == 0 and profiled_kv_pool(starved, workspace_bytes=0, **sizes).blocks == 1
    assert profile.bound(3 * GIB) == 2 * GIB + 3 * GIB + GIB


def _llm(path: Path, **kwargs) -> LLM:
    return LLM(str(path), device="cpu", num_kv_blocks=48, max_num_seqs=4, max_num_batched_tokens=64,
               max_model_len=256, **kwargs)


def _outputs(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = [SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, presence_penalty=0.5,
                             repetition_penalty=1.2),
              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, [params[i % 2] for i in range(len(prompts))])]


@pytest.mark.parametrize("kwargs", [{"attention_backend": "sdpa"}, {"kv_cache_dtype": "int8"}])
def test_dummy_step_runs_on_cpu_and_leaves_no_state(llama_dir: Path, kwargs):
    shared = [1] + list(range(10, 80))
    first, second = [shared + [5, 6], shared + [7]], [shared + [8, 9], shared + [11, 12, 13]]
    profiled, plain = _llm(llama_dir, **kwargs), _llm(llama_dir, **kwargs)
    runner = profiled.engine.executor.runner
    assert runner.step_profile is None                      # CPU: the pool is not sized by a profile
    assert _outputs(profiled, first) == _outputs(plain, first)

    layers = attention_layers(runner.model)
    views = [(layer.k_cache, layer.v_cache) for layer in layers]
    entries = runner.kv_pool.entries.clone()
    generator = runner.sampler.generator.get_state()
    held = dict(runner._penalty_slots._held)
    runner.dummy_step(layers, 256)                          # 64 tokens: a 61-token chunk and 3 decode rows
    assert all(layer.k_cache is k and layer.v_cache is v for layer, (k, v) in zip(layers, views))
    assert torch.equal(runner.kv_pool.entries, entries)
    assert torch.equal(runner.sampler.generator.get_state(), generator)
    assert runner._penalty_slots._held == held

    # The same tokens afterwards as an engine that never ran it: sampled (engine generator, penalties) and
    # greedy, from the prefix cache.
    assert _outputs(profiled, second) == _outputs(plain, second)
    assert profiled.engine.stats().prefix_cache_hits == plain.engine.stats().prefix_cache_hits > 0
