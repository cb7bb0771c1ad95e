"""CUDA graphs for decode, on CPU: only the CUDA graph API is faked (a graph needs a GPU). The fake's capture
runs the function once and keeps its output; its replay re-runs the recorded function, with the capture's
context (host-side values frozen, as a real replay's are), on the same static buffers, into that output."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving import LLM, SamplingParams
from serving.engine import cuda_graphs
from serving.engine.cuda_graphs import CudaGraphApi, GraphDecode, choose
from serving.engine.model_runner import forward
from serving.layers.attention_types import KVLayout
from serving.layers.flash_backend import FlashAttnBackend
from serving.layers.sdpa_backend import SdpaBackend
from tests.engine.test_buckets import BLOCK, NUM_BLOCKS, _context, decode_step, flat, random_kv_model
from tests.engine.test_engine import hf_greedy, random_prompt
from tests.fixtures.checkpoints import hf_model


class FakeGraph:
    def __init__(self, fn, out: torch.Tensor):
        self.fn, self.out = fn, out

    def replay(self) -> None:
        self.out.copy_(self.fn())


class FakeGraphApi:
    def __init__(self):
        self.captured: list[tuple[int, object]] = []      # (batch rows, pool) of each capture, in order

    def available(self, device: torch.device) -> bool:
        return True

    def pool(self) -> object:
        return object()

    def capture(self, fn, pool, device):
        out = fn()
        self.captured.append((out.shape[0], pool))
        return FakeGraph(fn, out), out


def _layout(device: str, block_size: int = 256) -> KVLayout:
    return KVLayout(block_size, 8, 4, 16, torch.bfloat16, torch.device(device), 1024)


def test_graphs_only_on_cuda_with_a_graph_safe_backend_and_not_when_disabled():
    flash = FlashAttnBackend(_layout("cuda"), varlen_func=lambda *args, **kwargs: None)
    sdpa = SdpaBackend(_layout("cuda", 16))
    fake = FakeGraphApi()
    assert choose(True, torch.device("cuda"), flash, fake) == (True, "flash_attn attention is graph-safe")
    on, why = choose(True, torch.device("cuda"), sdpa, fake)
    assert not on and "sdpa attention backend is not graph-safe" in why
    assert choose(False, torch.device("cuda"), flash, fake) == (False, "cuda_graphs=False")
    on, why = choose(True, torch.device("cpu"), flash, CudaGraphApi())
    assert not on and "need a CUDA device" in why


@pytest.mark.parametrize("backend_name", ["cpu_kernel", "sdpa"])
@torch.inference_mode()
def test_replays_match_eager_and_keep_real_kv(tiny_chat_dir, backend_name):
    """A capture per bucket, largest first into one pool, touching only the scratch block; replays of two steps
    with other lengths give the eager hidden states and KV writes. SDPA plans from host lengths (not graph-safe:
    it would pad every row to max_model_len), so forcing it checks that captures plan for the longest context."""
    model, backend, layout, pool = random_kv_model(tiny_chat_dir, backend_name, 64)
    num_blocks = NUM_BLOCKS
    before = pool.entries.clone()
    api = FakeGraphApi()
    graphs = GraphDecode(lambda ids, pos, ctx: forward(model, backend, ids, pos, ctx), layout, 4, num_blocks - 1, api)
    graphs.prepare()
    assert [rows for rows, _ in api.captured] == [4, 2, 1]
    assert len({id(p) for _, p in api.captured}) == 1
    real = torch.arange(num_blocks * BLOCK) < (num_blocks - 1) * BLOCK
    assert torch.equal(flat(pool.entries)[:, :, real], flat(before)[:, :, real])

    tables = torch.tensor([[0, 0, 0], [1, 2, 0], [3, 4, 5]], dtype=torch.int32)
    for rows, lens in ((slice(0, 3), [5, 17, 30]), (slice(1, 3), [18, 47])):       # buckets 4 and 2
        step_tables = tables[rows]
        input_ids, positions, slots, seq_lens = decode_step([11, 22, 33][rows], lens, step_tables)
        ctx = _context(input_ids, slots, seq_lens, step_tables)
        snapshot = pool.entries.clone()
        eager = forward(model, backend, input_ids, positions, ctx)
        eager_kv = pool.entries.clone()
        pool.entries.copy_(snapshot)
        replayed = graphs.run(input_ids, positions, _context(input_ids, slots, seq_lens, step_tables))
        torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
        written = torch.zeros(num_blocks * BLOCK, dtype=torch.bool)
        written[slots] = True
        torch.testing.assert_close(flat(pool.entries)[:, :, written], flat(eager_kv)[:, :, written],
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(flat(pool.entries)[:, :, real & ~written], flat(snapshot)[:, :, real & ~written])
    assert graphs.steps == 2

    # Beyond the largest bucket, or with a prefill: not replayed (the runner runs them eagerly).
    five = torch.arange(5)
    assert graphs.run(five, five, _context(five, five, torch.ones(5, dtype=torch.int32),
                                           torch.zeros(5, 1, dtype=torch.int32))) is None
    prefill = _context(five[:1], five[:1], torch.ones(1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32))
    prefill.num_prefill_seqs, prefill.num_prefill_tokens = 1, 1
    assert graphs.run(five[:1], five[:1], prefill) is None
    assert graphs.steps == 2


def test_engine_replays_pure_decode_steps_with_eager_and_transformers_tokens(llama_dir: Path, monkeypatch):
    """Batches of 3 (a bucket that is not a power of two), 2 and 1; chunked prefills mixed with decodes stay eager."""
    monkeypatch.setattr(cuda_graphs, "API", FakeGraphApi())
    prompts = [random_prompt(n, seed=i) for i, n in enumerate((5, 17, 42))]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (4, 8, 12)]
    common = {"device": "cpu", "max_num_seqs": 3, "num_kv_blocks": 64, "max_model_len": 128,
              "max_num_batched_tokens": 32}
    eager = LLM(str(llama_dir), cuda_graphs=False, **common)
    assert eager.engine.executor.runner.decode is None
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    hf = hf_model(llama_dir)
    assert expected == [hf_greedy(hf, p, k.max_tokens) for p, k in zip(prompts, params)]

    llm = LLM(str(llama_dir), **common)
    runner = llm.engine.executor.runner
    decode_batches: list[int] = []
    eager_steps = 0
    run = runner.run

    def recording_run(inputs):
        nonlocal eager_steps
        if inputs.num_prefill_seqs == 0:
            decode_batches.append(len(inputs.seq_lens_k))
        else:
            eager_steps += 1
        return run(inputs)

    monkeypatch.setattr(runner, "run", recording_run)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
    stats = llm.engine.stats()
    assert (stats.decode_path, stats.decode_buckets) == ("cuda_graphs", 3)
    assert set(decode_batches) == {1, 2, 3} and eager_steps > 0
    assert stats.bucketed_decode_steps == len(decode_batches)


def test_a_backend_that_is_not_graph_safe_keeps_decode_eager(tiny_chat_dir, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "API", FakeGraphApi())
    llm = LLM(str(tiny_chat_dir), device="cpu", attention_backend="sdpa", max_num_seqs=2, num_kv_blocks=16)
    assert llm.engine.executor.runner.decode is None
    llm.generate("Hello there", SamplingParams(temperature=0.0, max_tokens=3))
    stats = llm.engine.stats()
    assert stats.decode_path == "eager"
    # The default block size, resolved where the engine runs, is what the block manager counts in.
    assert (stats.block_size, stats.block_size_source) == (16, "auto: sdpa attention")
    assert llm.engine.block_manager.block_size == 16
