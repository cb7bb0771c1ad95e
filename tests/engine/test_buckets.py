"""Bucketed decode steps: bucket choice, static-buffer padding, and a padded step on the real model giving the
eager step's outputs while its padding rows touch only the scratch KV block."""
from __future__ import annotations

import pytest
import torch

from serving.engine import kv_cache
from serving.engine.buckets import DecodeBuffers, batch_buckets, bucket_for
from serving.engine.model_runner import forward
from serving.layers.attention import attention_layers, make_backend, select_backend
from serving.models.loader import load_model
from serving.utils.context import AttentionContext

BLOCK = 16


def test_buckets_are_powers_of_two_capped_by_max_num_seqs():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_buckets(4096, largest=256)[-1] == 256
    buckets = batch_buckets(48)
    assert [bucket_for(n, buckets) for n in (1, 3, 4, 5, 33, 48, 49)] == [1, 4, 4, 8, 48, 48, None]
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_fill_pads_rows_into_the_scratch_block_and_overwrites_stale_rows():
    buffers = DecodeBuffers(max_batch=8, max_blocks=4, block_size=BLOCK, scratch_block=9)
    buffers.fill(8, torch.arange(8), torch.arange(8), torch.arange(8), torch.full((8,), 7, dtype=torch.int32),
                 torch.ones(8, 4, dtype=torch.int32))
    step = buffers.fill(4, torch.tensor([5, 6, 7]), torch.tensor([3, 17, 40]), torch.tensor([3, 33, 72]),
                        torch.tensor([4, 18, 41], dtype=torch.int32),
                        torch.tensor([[0], [1], [4]], dtype=torch.int32))
    assert step.input_ids.tolist() == [5, 6, 7, 0]
    assert step.positions.tolist() == [3, 17, 40, 0]
    assert step.slot_mapping.tolist() == [3, 33, 72, 9 * BLOCK]
    assert step.seq_lens_k.tolist() == [4, 18, 41, 1]
    assert step.cu_seqlens_q.tolist() == [0, 1, 2, 3, 4]
    assert step.block_tables.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [4, 0, 0, 0], [9, 0, 0, 0]]
    assert step.unpad(torch.arange(4)).tolist() == [0, 1, 2]
    assert step.input_ids.data_ptr() == buffers.input_ids.data_ptr()   # views of the static buffers
    with pytest.raises(ValueError, match="does not fit"):
        buffers.fill(2, *[torch.zeros(3, dtype=torch.int64)] * 3, torch.ones(3, dtype=torch.int32),
                     torch.zeros(3, 1, dtype=torch.int32))


def flat(entries: torch.Tensor) -> torch.Tensor:
    """[2, layers, blocks, block_size, KVH, D] -> [2, layers, slot, KVH, D]."""
    return entries.flatten(2, 3)


def _context(input_ids, slots, seq_lens, tables) -> AttentionContext:
    n = len(input_ids)
    return AttentionContext(cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32), seq_lens_k=seq_lens,
                            slot_mapping=slots, block_tables=tables, host_cu_seqlens_q=list(range(n + 1)),
                            host_seq_lens_k=seq_lens.tolist(), num_prefill_seqs=0, num_prefill_tokens=0)


NUM_BLOCKS = 8                  # blocks 0-6 for sequences, 7 the scratch block


def random_kv_model(model_dir, backend_name: str, max_model_len: int):
    """(model, backend, layout, KV pool) on CPU: NUM_BLOCKS random blocks, the last (the scratch block) zeroed."""
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    layers = attention_layers(model)
    name = select_backend(backend_name, torch.device("cpu"), torch.float32, BLOCK)
    layout = kv_cache.kv_layout(layers, BLOCK, torch.float32, torch.device("cpu"), max_model_len)
    backend = make_backend(name, layout)
    pool = kv_cache.attach(layers, backend, NUM_BLOCKS, layout)
    pool.entries.copy_(torch.randn(pool.entries.shape, generator=torch.Generator().manual_seed(0)))
    pool.entries[:, :, NUM_BLOCKS - 1] = 0
    return model, backend, layout, pool


def decode_step(input_ids: list[int], seq_lens: list[int], tables: torch.Tensor):
    """(input_ids, positions, slot_mapping, seq_lens_k) of one decode token per sequence."""
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    positions = lens.long() - 1
    slots = tables[torch.arange(len(seq_lens)), positions // BLOCK].long() * BLOCK + positions % BLOCK
    return torch.tensor(input_ids), positions, slots, lens


@pytest.mark.parametrize("backend_name", ["auto", "sdpa"])
@torch.inference_mode()
def test_padded_decode_matches_eager_and_keeps_real_kv(tiny_chat_dir, backend_name):
    model, backend, _, pool = random_kv_model(tiny_chat_dir, backend_name, 256)
    num_blocks = NUM_BLOCKS
    before = pool.entries.clone()
    # Three decoding sequences with contexts of 5, 17 and 30 tokens (after this step's token).
    tables = torch.tensor([[0, 0], [1, 2], [3, 4]], dtype=torch.int32)
    input_ids, positions, slots, seq_lens = decode_step([11, 22, 33], [5, 17, 30], tables)

    eager = forward(model, backend, input_ids, positions, _context(input_ids, slots, seq_lens, tables))
    eager_kv = pool.entries.clone()
    pool.entries.copy_(before)
    step = DecodeBuffers(max_batch=8, max_blocks=4, block_size=BLOCK, scratch_block=num_blocks - 1).fill(
        bucket_for(3, batch_buckets(8)), input_ids, positions, slots, seq_lens, tables)
    assert step.bucket == 4
    padded = forward(model, backend, step.input_ids, step.positions,
                     _context(step.input_ids, step.slot_mapping, step.seq_lens_k, step.block_tables))

    torch.testing.assert_close(step.unpad(padded), eager, rtol=1e-5, atol=1e-5)
    written = torch.zeros(num_blocks * BLOCK, dtype=torch.bool)
    written[slots] = True
    real = torch.arange(num_blocks * BLOCK) < (num_blocks - 1) * BLOCK
    # The real sequences' KV: the step's own slots as eager wrote them (up to GEMM blocking at another batch
    # size), every other slot untouched; the padding rows wrote one scratch slot and nothing else.
    torch.testing.assert_close(flat(pool.entries)[:, :, written], flat(eager_kv)[:, :, written],
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(flat(pool.entries)[:, :, real & ~written], flat(before)[:, :, real & ~written])
    scratch = pool.entries[:, :, num_blocks - 1]
    assert scratch[:, :, 0].abs().sum() > 0 and scratch[:, :, 1:].abs().sum() == 0
