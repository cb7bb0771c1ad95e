"""The native decode step (serving/models/native_decode.py) against the eager layers: the same tokens and
bit-identical log-probabilities, and taken only where it applies (parity with transformers is tested on the
default engine, which takes it, in test_model.py and test_engine.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving import LLM, SamplingParams
from serving.kernels import llama_decode_layers
from serving.models import native_decode
from serving.utils.context import AttentionContext
from tests.fixtures.checkpoints import write_llama_checkpoint

PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def gqa64_dir(tmp_path_factory: pytest.TempPathFactory, tiny_chat_dir: Path) -> Path:
    """head_dim 64 (the attention kernel's vectorised loops), 2 query heads per KV head, 3 layers, untied."""
    return write_llama_checkpoint(tmp_path_factory.mktemp("gqa64"), tiny_chat_dir, seed=3, hidden_size=256,
                                  num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                                  tie_word_embeddings=False)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the native calls of the engines built after this."""
    kernel, calls = llama_decode_layers(), []
    if kernel is None:
        pytest.skip("no C compiler here")

    def counted(*args):
        calls.append(args[10])       # the step's rows
        return kernel(*args)

    monkeypatch.setattr(native_decode, "llama_decode_layers", lambda: counted)
    return calls


def _generate(path: Path, prompts: list[list[int]], **engine_args) -> list:
    llm = LLM(str(path), num_kv_blocks=256, enable_prefix_caching=False, **engine_args)
    return [o.outputs[0] for o in llm.generate(prompts, PARAMS)]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("fixture", ["llama_dir", "gqa64_dir"])
def test_native_steps_are_bit_identical_to_the_eager_layers(fixture: str, kv_cache_dtype: str,
                                                           request: pytest.FixtureRequest,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = request.getfixturevalue(fixture)
    calls = _counting(monkeypatch)
    # Contexts that end inside, and cross, 16-token blocks; decode batches of 6 rows down to 1 (staggered ends).
    prompts = [list(range(3, 3 + n)) for n in (5, 16, 31, 47, 2, 70)]
    native = _generate(path, prompts, kv_cache_dtype=kv_cache_dtype)
    assert calls and max(calls) == len(prompts), "the decode steps should have run natively"
    monkeypatch.setattr(native_decode, "NATIVE_DECODE_MAX_ROWS", 0)
    taken = len(calls)
    eager = _generate(path, prompts, kv_cache_dtype=kv_cache_dtype)
    assert len(calls) == taken
    for a, b in zip(native, eager):
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs      # floats compared exactly


def test_native_step_only_where_it_applies(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    wide = [list(range(3, 13))] * (native_decode.NATIVE_DECODE_MAX_ROWS + 1)
    _generate(llama_dir, wide)                      # every decode step has more rows than the native limit
    _generate(llama_dir, wide[:2], quantization="int8")
    _generate(llama_dir, wide[:2], attention_backend="sdpa")
    assert calls == []


def test_a_slot_outside_the_pool_is_refused_before_the_native_call(llama_dir: Path) -> None:
    """The eager KV write (index_copy_) raises on a slot past the pool; the C code would write there."""
    llm = LLM(str(llama_dir), num_kv_blocks=8, enable_prefix_caching=False)
    model = llm.engine.executor.runner.model.model
    pool = model.layers[0].self_attn.attn.k_cache
    slots = pool.shape[0] * pool.shape[1]
    before = pool.clone()

    def context(slot: int) -> AttentionContext:
        return AttentionContext(
            cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32), seq_lens_k=torch.tensor([1], dtype=torch.int32),
            slot_mapping=torch.tensor([slot]), block_tables=torch.zeros(1, 1, dtype=torch.int32),
            host_cu_seqlens_q=[0, 1], host_seq_lens_k=[1], num_prefill_seqs=0, num_prefill_tokens=0)

    ids, positions = torch.tensor([5]), torch.tensor([0])
    for bad in (slots, -1):
        with pytest.raises(IndexError, match="outside the pool"):
            model.native_decode(model, ids, positions, context(bad))
    assert torch.equal(pool, before)
    assert model.native_decode(model, ids, positions, context(slots - 1)) is not None
