"""Capacity planner formulas against what the real engine allocates (tiny and ~100M models), and the command."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from serving.capacity import (
    Deployment,
    Hardware,
    Load,
    ModelShape,
    kv_bytes_per_token,
    kv_pool_blocks,
    plan,
    weight_bytes_per_gpu,
)
from serving.cli import main
from serving.config import EngineConfig
from serving.engine import model_runner
from serving.engine.block_size import resolve_block_size
from serving.engine.model_runner import ModelRunner
from tests.fixtures.checkpoints import write_llama_checkpoint

# The throughput benchmark's ~100M shape (Llama-2 proportions, MHA), on the tiny tokenizer's vocabulary.
SHAPE_100M = dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=12, max_position_embeddings=2048, tie_word_embeddings=False)
LLAMA2_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096}
FREE_BYTES = 3 * 2**30  # what the engine is told is free when it sizes its KV pool


@pytest.fixture(scope="module")
def model_100m(tmp_path_factory, tiny_chat_dir) -> Path:
    vocab = json.loads((tiny_chat_dir / "config.json").read_text())["vocab_size"]
    return write_llama_checkpoint(tmp_path_factory.mktemp("llama-100m"), tiny_chat_dir, seed=0, vocab_size=vocab,
                                  **SHAPE_100M)


def _runner(path: Path, monkeypatch, **config) -> ModelRunner:
    pages = {"SC_AVPHYS_PAGES": FREE_BYTES // 4096, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(model_runner, "os", SimpleNamespace(sysconf=pages.__getitem__))
    engine, _ = resolve_block_size(EngineConfig(model=str(path), device="cpu", **config))
    return ModelRunner(engine, path, engine.max_model_len or ModelShape.load(path).max_position_embeddings)


@pytest.mark.parametrize("which", ["tiny", "100m"])
def test_weights_kv_bytes_and_pool_match_the_engine(which, tiny_chat_dir, model_100m, monkeypatch):
    path = tiny_chat_dir if which == "tiny" else model_100m
    shape = ModelShape.load(path)
    # Few sequences on the tiny model, so the max_num_seqs cap decides; the 100M model fills the budget.
    max_num_seqs = 4 if which == "tiny" else 256
    runner = _runner(path, monkeypatch, dtype="float32", max_num_seqs=max_num_seqs, kv_cache_memory_fraction=0.25)
    d = Deployment(dtype="float32", max_num_seqs=max_num_seqs, kv_cache_memory_fraction=0.25)

    measured_weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    measured_kv_token = runner.kv_pool.nbytes // runner.kv_pool.capacity_tokens
    assert weight_bytes_per_gpu(shape, d) == measured_weights
    assert kv_bytes_per_token(shape, d) == measured_kv_token
    # The budget counts the attention workspace: the kernel backend gathers one prefill sequence's keys and
    # values (float32), at most max_model_len tokens of them.
    assert runner.attention_backend == "cpu_kernel"
    workspace = 2 * shape.max_position_embeddings * shape.num_kv_heads * shape.head_dim * 4
    assert runner.backend.workspace_bytes == workspace
    assert kv_pool_blocks(FREE_BYTES, shape, d, shape.max_position_embeddings, workspace) == runner.num_kv_blocks
    useful = max_num_seqs * math.ceil(shape.max_position_embeddings / 16)
    assert (runner.num_kv_blocks == useful) == (which == "tiny")  # both branches of the pool size are exercised


def test_bfloat16_weights_and_kv(tiny_chat_dir, monkeypatch):
    runner = _runner(tiny_chat_dir, monkeypatch, dtype="bfloat16", num_kv_blocks=8)
    shape, d = ModelShape.load(tiny_chat_dir), Deployment(dtype="bfloat16")
    assert weight_bytes_per_gpu(shape, d) == sum(p.numel() * p.element_size() for p in runner.model.parameters())
    assert kv_bytes_per_token(shape, d) * 8 * 16 == runner.kv_pool.nbytes


def test_block_size_default_is_the_engines_auto_on_gpus_with_flash_attn():
    # Without checking flash-attn's import: the plan is for GPUs that have it, not for this machine.
    assert Deployment().block_size == Deployment(dtype="float16").block_size == 256
    assert Deployment(dtype="float32").block_size == Deployment(kv_cache_dtype="int8").block_size == 16
    assert Deployment(block_size=64).block_size == 64


def test_llama2_70b_on_8x80gb():
    shape = ModelShape.from_config(LLAMA2_70B)
    hw, load = Hardware(), Load(requests_per_s=20, prompt_tokens=512, output_tokens=256)
    bf16 = plan(shape, hw, Deployment(tensor_parallel_size=8), load)
    # 68,976,648,192 parameters (the published count) in bf16, split 8 ways except 161 norm vectors.
    norms = 161 * 8192
    assert bf16.weight_bytes_per_gpu == 2 * ((68_976_648_192 - norms) // 8 + norms)
    # GQA: 8 KV heads, one per rank; 80 layers x K and V x 128 dims x 2 bytes.
    assert bf16.kv_bytes_per_token == 80 * 2 * 128 * 2
    context = 512 + 128
    assert bf16.decode_tok_s_batch1 == pytest.approx(2039e9 / (bf16.weight_bytes_per_gpu + context * 40960))
    int8 = plan(shape, hw, Deployment(tensor_parallel_size=8, kv_cache_dtype="int8", quantization="int8"), load)
    assert int8.kv_bytes_per_token == 80 * 2 * (128 + 4)
    assert 0.5 < int8.weight_bytes_per_gpu / bf16.weight_bytes_per_gpu < 0.52
    assert int8.kv_tokens > 2 * bf16.kv_tokens and int8.decode_tok_s_batch1 > 1.9 * bf16.decode_tok_s_batch1
    assert bf16.fits and bf16.replicas_available == 1 and bf16.replicas_needed >= 1
    # TP=4 puts two KV heads on each rank, and 34.5 GB of weights.
    tp4 = plan(shape, hw, Deployment(tensor_parallel_size=4), load)
    assert tp4.kv_bytes_per_token == 2 * bf16.kv_bytes_per_token and tp4.replicas_available == 2


def test_plan_command(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_70B))
    assert main(["plan", "--model", str(tmp_path), "--tensor-parallel-size", "8", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["plan"]["kv_bytes_per_token"] == 40960 and printed["deployment"]["dtype"] == "bfloat16"
    # The engine's auto block size on GPUs with flash-attn: its 256-token pages in bf16 with a bf16 KV cache.
    assert printed["deployment"]["block_size"] == 256
    assert main(["plan", "--model", str(tmp_path), "--kv-cache-dtype", "int8", "--block-size", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deployment"]["block_size"] == 32
    assert main(["plan", "--model", str(tmp_path / "config.json"), "--tensor-parallel-size", "8"]) == 0
    assert "batch-1 decode, bandwidth bound" in capsys.readouterr().out
    assert main(["plan", "--model", str(tmp_path), "--tensor-parallel-size", "3"]) == 2
    assert "tensor_parallel_size=3 must divide" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path / "missing")]) == 2


def test_default_kv_pool_says_which_bound_holds():
    from serving.capacity import default_kv_pool

    # 256 sequences of 4096 tokens in 16-token blocks of 64 KiB: 4 GiB, under 30% of 64 GiB.
    full = default_kv_pool(64 * 2**30, 2**16, 0.3, 256, 4096, 16)
    assert full.blocks == 256 * 256 and "max_num_seqs=256" in full.reason and "30% of 64.0 GiB" in full.reason
    # With 8 GiB free the memory share binds: 2.4 GiB of blocks, and the line says what the batch would need.
    short = default_kv_pool(8 * 2**30, 2**16, 0.3, 256, 4096, 16)
    assert short.blocks == int(8 * 2**30 * 0.3) // 2**16 and "would use 4.0 GiB" in short.reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_cpu_kv_pool_is_zero_and_resident_only_where_written(dtype):
    import psutil

    from serving.engine.kv_cache import zeros

    process = psutil.Process()
    shape = (2, 4, 4096, 16, 8, 64)
    before = process.memory_info().rss
    pool = zeros(shape, dtype, torch.device("cpu"))  # 256 MiB (int8) to 1 GiB (float32)
    untouched = process.memory_info().rss - before
    pool[:, :, :8] = 1  # the first 8 blocks of each of the 8 (key/value, layer) slices
    touched = process.memory_info().rss - before
    pool_bytes = pool.numel() * pool.element_size()
    assert pool.shape == shape and pool.dtype == dtype and pool.is_contiguous()
    assert int(torch.count_nonzero(pool[:, :, 8:])) == 0 and bool((pool[:, :, :8] == 1).all())
    assert untouched < 8 * 2**20
    # 8 of 4096 blocks written: resident memory grows by those pages (2 MiB ones with transparent huge pages),
    # far from the whole pool.
    assert touched < pool_bytes / 4
