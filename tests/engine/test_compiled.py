"""The `compile` option: greedy tokens identical to the eager engine over two decode buckets, every bucket
compiled at start and none after."""
from __future__ import annotations

import torch

from serving import LLM, SamplingParams


def test_compiled_decode_matches_eager_without_recompiles(tiny_chat_dir, llama_alt_dir, monkeypatch):
    # Dynamo's per-code recompile limit below the bucket count (as its default 8 is below max_num_seqs=256's
    # 9 buckets): every bucket must still compile, not fall back to eager.
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    prompts = ["The quick brown fox", "Once upon a time there", "A short one"]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    # max_num_seqs=2: buckets 1 and 2; three prompts decode at batch 2, then the last one alone at batch 1.
    common = dict(device="cpu", max_num_seqs=2, num_kv_blocks=32, max_model_len=128)
    eager = [o.outputs[0].token_ids for o in LLM(str(tiny_chat_dir), **common).generate(prompts, params)]
    llm = LLM(str(tiny_chat_dir), compile=True, **common)
    compiled = llm.engine.executor.runner.decode
    assert sorted(compiled.compile_seconds) == [1, 2]
    # Every bucket compiled every piece of the forward (a bucket past the limit compiles fewer, or none).
    frames = compiled.frames_per_bucket
    assert frames[1] > 0 and frames[2] == frames[1], frames
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == eager
    assert compiled.steps >= 11                  # the decode steps ran compiled
    assert compiled.recompiles_since_warmup == 0
    # A model of other shapes in the same process (dynamo's limit counts per code object, which both share)
    # compiles every bucket too.
    other = LLM(str(llama_alt_dir), compile=True, **common).engine.executor.runner.decode.frames_per_bucket
    assert other[1] > 0 and other[2] == other[1], other
