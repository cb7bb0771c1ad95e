"""The native CPU decode-attention kernel against plain softmax attention over the same paged cache, and the
backend choice (and its fallback when the kernel cannot be built)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving import kernels
from serving.layers import kv_quant
from serving.layers.attention import select_backend


def reference_decode(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """Softmax attention of each sequence's one query over its first seq_lens[i] cached tokens."""
    num_kv_heads = k_cache.shape[2]
    outs = []
    for i, length in enumerate(seq_lens.tolist()):
        blocks = block_tables[i, : -(-length // k_cache.shape[1])].long()
        k = k_cache[blocks].flatten(0, 1)[:length]                        # [L, KVH, D]
        v = v_cache[blocks].flatten(0, 1)[:length]
        group = q.shape[1] // num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [L, H, D]
        weights = (torch.einsum("hd,lhd->hl", q[i], k) * scale).softmax(dim=-1)
        outs.append(torch.einsum("hl,lhd->hd", weights, v))
    return torch.stack(outs)


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim", "block_size"), [
    (8, 4, 32, 16),      # the default model's grouped-query shape
    (8, 8, 64, 16),      # multi-head
    (8, 1, 128, 32),     # multi-query
    (64, 8, 128, 16),    # Llama-2-70B's attention shape
    (6, 2, 64, 16),      # llama-prop: 3 query rows per KV head, one row chunk
    (4, 2, 40, 16),      # vectorised (a multiple of 8), the weighted sum ends on an 8-wide slice
    (4, 4, 36, 16),      # 4 elements past the last multiple of 8: the scalar tails
    (12, 1, 64, 16),     # 12 query rows per KV head: several row chunks, the last one partial
])
@pytest.mark.parametrize("num_seqs", [1, 3, 20])   # few sequences split by head; many run whole
def test_kernel_matches_softmax_attention(num_heads, num_kv_heads, head_dim, block_size, num_seqs):
    kernel = kernels.paged_decode_attention()
    assert kernel is not None, "the test machine has a C compiler with OpenMP"
    gen = torch.Generator().manual_seed(num_heads * 1000 + num_seqs)
    num_blocks = 64
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    # Lengths on and around block boundaries, a single token, and a long context; blocks in random order.
    lengths = [1, block_size, block_size + 1, 5, 300, 2 * block_size - 1][:num_seqs]
    lengths += torch.randint(1, 400, (num_seqs - len(lengths),), generator=gen).tolist()
    max_blocks = -(-max(lengths) // block_size)
    block_tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in lengths])
    block_tables = block_tables.to(torch.int32)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(num_seqs, num_heads, head_dim, generator=gen)
    scale = head_dim**-0.5

    out = torch.full_like(q, float("nan"))
    kernel(out, q, k_cache, v_cache, block_tables, seq_lens, scale)
    expected = reference_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_backend_choice_and_fallback_without_a_compiler(monkeypatch):
    cpu = torch.device("cpu")
    assert select_backend("auto", cpu, torch.float32, 16) == "cpu_kernel"
    assert select_backend("sdpa", cpu, torch.float32, 16) == "sdpa"
    # The kernel is float32 only: other CPU dtypes take SDPA, and asking for the kernel there is an error.
    assert select_backend("auto", cpu, torch.bfloat16, 16) == "sdpa"
    with pytest.raises(ValueError, match="float32 CPU model"):
        select_backend("cpu_kernel", cpu, torch.bfloat16, 16)

    monkeypatch.setenv("CC", "/nonexistent/cc")
    kernels._library.cache_clear()
    try:
        assert kernels.paged_decode_attention() is None
        assert select_backend("auto", cpu, torch.float32, 16) == "sdpa"
        with pytest.raises(ValueError, match="C compiler"):
            select_backend("cpu_kernel", cpu, torch.float32, 16)
    finally:
        kernels._library.cache_clear()


def test_a_variant_build_of_the_kernel_file_computes_the_same(tmp_path: Path):
    """build_variant (what benchmarks/attention_kernel.py --compare-source uses) builds a given source with the
    package's flags: built from the package's own file, it gives bit-identical outputs, float32 and int8."""
    source = Path(kernels.__file__).parent / "paged_attention.c"
    variant = kernels.attention_entry(kernels.build_variant("paged_attention.c", source, tmp_path / "variant.so"))
    kernel = kernels.paged_decode_attention()
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache = (torch.randn(32, 16, 2, 64, generator=gen) for _ in range(2))
    (k_codes, k_params), (v_codes, v_params) = kv_quant.quantize(k_cache), kv_quant.quantize(v_cache)
    tables = torch.stack([torch.randperm(32, generator=gen)[:8] for _ in range(12)]).to(torch.int32)
    seq_lens = torch.randint(1, 128, (12,), generator=gen, dtype=torch.int32)
    q = torch.randn(12, 6, 64, generator=gen)
    for caches in ((k_cache, v_cache), (k_codes, v_codes, k_params, v_params)):
        ours, theirs = torch.empty_like(q), torch.empty_like(q)
        kernel(ours, q, *caches[:2], tables, seq_lens, 0.125, *caches[2:])
        variant(theirs, q, *caches[:2], tables, seq_lens, 0.125, *caches[2:])
        assert torch.equal(ours, theirs)
