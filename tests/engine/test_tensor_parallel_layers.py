"""Sharded layers: TP=2 over gloo gives the TP=1 logits, each rank holding about half the weights."""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from serving.layers import int8_weights
from serving.models.loader import load_model
from serving.parallel.state import destroy_tensor_parallel, init_tensor_parallel
from tests.fixtures.checkpoints import write_llama_checkpoint
from tests.fixtures.paged_harness import PagedHarness

STEPS = [
    {0: list(range(3, 40)), 1: list(range(50, 57))},   # two prompts
    {0: [11], 1: [12]},                                # one decode step
]


def run_steps(path: str, rank: int = 0, world: int = 1, init_method: str = "", int8: bool = False) -> dict:
    """int8: an int8 KV cache and int8 weights (each rank quantizing its own shard)."""
    if world > 1:
        init_tensor_parallel(rank, world, init_method, torch.device("cpu"))
    try:
        model = load_model(Path(path), torch.float32, torch.device("cpu"), "int8" if int8 else None)
        harness = PagedHarness(model, kv_cache_dtype="int8" if int8 else "auto")
        logits = [harness.step(step) for step in STEPS]
        sharded = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" not in n)
        return {"logits": logits, "param_bytes": sharded}
    finally:
        destroy_tensor_parallel()


def _rank_main(args: tuple) -> dict:
    return run_steps(*args)


@pytest.fixture(scope="module")
def mqa_dir(tmp_path_factory: pytest.TempPathFactory, tiny_chat_dir: Path) -> Path:
    """One KV head (fewer than the ranks, so it is replicated) and a vocabulary that does not divide by 2."""
    return write_llama_checkpoint(tmp_path_factory.mktemp("mqa"), tiny_chat_dir, seed=3,
                                  num_key_value_heads=1, vocab_size=1003, tie_word_embeddings=False)


# int8: each rank quantizes its own KV heads (the scales are per head, so they shard with them) and its own
# weight shards (row-parallel ones with their whole rows' scales, so the codes are TP=1's).
@pytest.mark.parametrize(("fixture", "int8"), [("llama_dir", False), ("mqa_dir", False), ("llama_dir", True)])
def test_tp2_matches_tp1(fixture: str, int8: bool, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    path = str(request.getfixturevalue(fixture))
    single = run_steps(path, int8=int8)
    init = f"file://{tmp_path / 'rendezvous'}"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        ranks = pool.map(_rank_main, [(path, r, 2, init, int8) for r in range(2)])
    # int8: a summation-order difference of 1e-7 moves a KV code by one step where a value sits on a rounding
    # boundary, shifting logits by up to ~1e-3 (the prefill step). Decode rows (and with ATen's AVX-512
    # kernels every row: int8_weights.PACKED_MAX_ROWS) run int8 weights with bfloat16 activations, so a
    # row-parallel layer's partial sums are rounded to bfloat16 before the all-reduce instead of after:
    # differences of bfloat16's resolution, ~0.3% of the logits' spread of 7.
    prefill_atol = 3e-3 if int8_weights.PACKED_MAX_ROWS < sum(map(len, STEPS[0].values())) else 5e-2
    atols = [prefill_atol, 5e-2] if int8 else [1e-4, 1e-4]
    for rank in ranks:
        for got, want, atol in zip(rank["logits"], single["logits"], atols):
            torch.testing.assert_close(got, want, atol=atol, rtol=0)
        # Attention and MLP weights split in half; replicated KV heads and the padded vocab row add a little.
        assert 0.45 <= rank["param_bytes"] / single["param_bytes"] <= 0.6
