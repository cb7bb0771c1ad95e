"""Attention backend selection (flash-attn's rules, checked on the CPU with its import mocked), the SDPA
decode tiles (bounded padding on CUDA, the CPU tiles as they were) and the workspace the KV budget counts."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from serving.config import EngineConfig
from serving.engine.block_size import resolve_block_size
from serving.layers import attention
from serving.layers.attention import auto_block_size, select_backend
from serving.layers.flash_backend import load_flash_attn
from serving.layers.sdpa_backend import CPU_POLICY, CUDA_POLICY, decode_tiles
from serving.models.loader import load_model
from tests.fixtures.paged_harness import PagedHarness

CUDA = torch.device("cuda")   # a device object only: nothing runs on it


@pytest.fixture
def flash_imports(monkeypatch):
    monkeypatch.setattr(attention, "load_flash_attn", lambda: (lambda *args, **kwargs: None, ""))


def test_flash_attn_is_chosen_only_where_it_runs(flash_imports):
    assert select_backend("auto", CUDA, torch.bfloat16, 256) == "flash_attn"
    assert select_backend("auto", CUDA, torch.float16, 512) == "flash_attn"
    # fp32, a block size its pages do not take, or no CUDA: auto falls back to SDPA ...
    assert select_backend("auto", CUDA, torch.float32, 256) == "sdpa"
    assert select_backend("auto", CUDA, torch.bfloat16, 16) == "sdpa"
    assert select_backend("auto", torch.device("cpu"), torch.bfloat16, 256) == "sdpa"
    assert select_backend("sdpa", CUDA, torch.bfloat16, 256) == "sdpa"
    # ... and asking for it by name is an error that says why.
    with pytest.raises(ValueError, match="float16 or bfloat16 only .got dtype=float32"):
        select_backend("flash_attn", CUDA, torch.float32, 256)
    with pytest.raises(ValueError, match="block_size % 256 == 0 .got 16"):
        select_backend("flash_attn", CUDA, torch.bfloat16, 16)
    with pytest.raises(ValueError, match="needs a CUDA device .got cpu"):
        select_backend("flash_attn", torch.device("cpu"), torch.bfloat16, 256)
    with pytest.raises(ValueError, match="invalid attention_backend='flash'"):
        select_backend("flash", CUDA, torch.bfloat16, 256)


def test_auto_block_size_is_flash_attns_page_only_where_flash_attn_runs(flash_imports):
    def resolved(**config) -> tuple[int, str]:
        engine, source = resolve_block_size(EngineConfig(**config))
        return engine.block_size, source

    assert resolved(device="cuda") == (256, "auto: flash_attn's paged kernel takes blocks of 256 tokens")
    assert resolved(device="cuda", dtype="float16", attention_backend="flash_attn")[0] == 256
    block, why = resolved(device="cuda", kv_cache_dtype="int8")
    assert block == 16 and "kv_cache_dtype='int8'" in why
    block, why = resolved(device="cuda", dtype="float32")
    assert block == 16 and "float16 or bfloat16 only" in why
    assert resolved(device="cpu", dtype="bfloat16")[0] == 16
    assert resolved(device="cuda", attention_backend="sdpa") == (16, "auto: sdpa attention")
    # A step budget under a flash page keeps small blocks; flash_attn by name keeps its page (and the check).
    assert resolved(device="cuda", max_num_batched_tokens=128) == (16, "auto: max_num_batched_tokens=128 is under 256")
    with pytest.raises(ValueError, match="max_num_batched_tokens=128"):
        resolved(device="cuda", attention_backend="flash_attn", max_num_batched_tokens=128)
    # Explicit values stay as given, and flash_attn by name with 16-token blocks is still its error.
    assert resolved(device="cuda", block_size=16) == (16, "block_size as configured")
    assert resolved(device="cpu", block_size=256) == (256, "block_size as configured")
    with pytest.raises(ValueError, match="block_size % 256 == 0 .got 16"):
        select_backend("flash_attn", CUDA, torch.bfloat16, resolved(device="cuda", block_size=16)[0])


def test_auto_block_size_without_flash_attn_and_on_cpu(monkeypatch):
    """Without flash-attn: 16 on CUDA too, and on CPU."""
    monkeypatch.setattr(attention, "load_flash_attn", lambda: (None, "flash-attn does not import (mocked)"))
    block, why = auto_block_size("auto", CUDA, torch.bfloat16)
    assert block == 16 and "flash-attn does not import" in why
    engine, source = resolve_block_size(EngineConfig(device="cpu"))
    assert engine.block_size == 16 and source.startswith("auto: ")
    with pytest.raises(ValueError, match="cannot run here: flash-attn does not import"):
        resolve_block_size(EngineConfig(device="cuda", attention_backend="flash_attn"))


def test_flash_attn_whose_extension_does_not_load_is_refused_at_start(monkeypatch):
    """The package is there (find_spec would say yes) but its CUDA extension does not import."""
    package = types.ModuleType("flash_attn")
    package.flash_attn_varlen_func = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn_2_cuda", None)   # import raises ImportError
    varlen, why = load_flash_attn()
    assert varlen is None and "flash-attn does not import" in why
    assert select_backend("auto", CUDA, torch.bfloat16, 256) == "sdpa"
    with pytest.raises(ValueError, match="cannot run here: flash-attn does not import"):
        select_backend("flash_attn", CUDA, torch.bfloat16, 256)
    extension = types.ModuleType("flash_attn_2_cuda")
    monkeypatch.setitem(sys.modules, "flash_attn_2_cuda", extension)
    assert load_flash_attn() == (package.flash_attn_varlen_func, "")
    assert select_backend("flash_attn", CUDA, torch.bfloat16, 256) == "flash_attn"


def test_cuda_decode_tiles_pad_no_row_to_the_longest_context():
    """One long context among many short ones: on CUDA no row is padded to more than twice its length plus a
    block, and no tile gathers more than the workspace bound; the CPU tiles are unchanged."""
    lens = sorted([4000] + [17 + 31 * i for i in range(63)], reverse=True)
    tile_tokens = CUDA_POLICY.tile_bytes // (2 * 8 * 128 * 2)   # a Llama-3-8B rank in bf16
    tiles = decode_tiles(lens, 16, tile_tokens, CUDA_POLICY)
    assert sum(count for _, count in tiles) == len(lens) and tiles[0] == (0, 1)
    for start, count in tiles:
        padded = -(-lens[start] // 16) * 16
        assert all(padded <= 2 * n + 16 for n in lens[start:start + count])
        assert count * padded <= max(tile_tokens, padded)
    cpu = decode_tiles(lens, 16, CPU_POLICY.tile_bytes // 1024, CPU_POLICY)
    assert [count for _, count in cpu][:2] == [4, 4]   # at least 4 rows, padded to the tile's longest


def test_workspace_bounds_what_sdpa_allocates(llama_dir: Path):
    """A mixed step with one long prompt, then a decode over it and short contexts: the gather buffers
    the backend holds stay within the workspace_bytes the KV budget subtracts."""
    model = load_model(llama_dir, torch.float32, torch.device("cpu"))
    harness = PagedHarness(model, num_blocks=64, backend="sdpa")
    gen = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(3, model.config.vocab_size, (700,), generator=gen).tolist()
    harness.step({0: long_prompt, 1: [5, 6, 7], 2: [8, 9]})
    for token in range(3):
        harness.step({0: [token + 3], 1: [token + 3], 2: [token + 3]})
    workspace = harness.backend._workspace
    held = sum(b.numel() * b.element_size() for b in workspace._buffers.values())
    assert 0 < held <= harness.backend.workspace_bytes
    # CPU tiles: about 2 MiB, or 4 rows of the longest context.
    layout = harness.layout
    assert harness.backend.workspace_bytes == max(
        CPU_POLICY.tile_bytes, CPU_POLICY.tile_min_rows * layout.max_model_len * layout.gathered_bytes_per_token)
