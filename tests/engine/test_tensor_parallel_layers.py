"""Sharded layers: TP=2 over gloo gives the TP=1 logits, each rank holding about half the weights."""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from serving.models.loader import load_model
from serving.parallel.state import destroy_tensor_parallel, init_tensor_parallel
from tests.fixtures.checkpoints import write_llama_checkpoint
from tests.fixtures.paged_harness import PagedHarness

STEPS = [
    {0: list(range(3, 40)), 1: list(range(50, 57))},   # two prompts
    {0: [11], 1: [12]},                                # one decode step
]


def run_steps(path: str, rank: int = 0, world: int = 1, init_method: str = "", kv_cache_dtype: str = "auto") -> dict:
    if world > 1:
        init_tensor_parallel(rank, world, init_method, torch.device("cpu"))
    try:
        model = load_model(Path(path), torch.float32, torch.device("cpu"))
        harness = PagedHarness(model, kv_cache_dtype=kv_cache_dtype)
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


# int8 KV: each rank quantizes its own KV heads; the scales are per head, so they shard with them.
@pytest.mark.parametrize(("fixture", "kv_cache_dtype"), [("llama_dir", "auto"), ("mqa_dir", "auto"),
                                                         ("llama_dir", "int8")])
def test_tp2_matches_tp1(fixture: str, kv_cache_dtype: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    path = str(request.getfixturevalue(fixture))
    single = run_steps(path, kv_cache_dtype=kv_cache_dtype)
    init = f"file://{tmp_path / 'rendezvous'}"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        ranks = pool.map(_rank_main, [(path, r, 2, init, kv_cache_dtype) for r in range(2)])
    # A summation-order difference of 1e-7 moves an int8 code by one step where a value sits on a rounding
    # boundary: a few in ten thousand, each shifting logits by ~1e-3 at most.
    atol = 1e-4 if kv_cache_dtype == "auto" else 3e-3
    for rank in ranks:
        for got, want in zip(rank["logits"], single["logits"]):
            torch.testing.assert_close(got, want, atol=atol, rtol=0)
        # Attention and MLP weights split in half; replicated KV heads and the padded vocab row add a little.
        assert 0.45 <= rank["param_bytes"] / single["param_bytes"] <= 0.6
