"""Block manager (ref counts, prefix caching, eviction) and scheduler (continuous batching, chunked
prefill, preemption), driven without a model: a step 'computes' the scheduled tokens and samples token 7."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from serving.engine.block_manager import BlockManager
from serving.engine.detokenizer import IncrementalDetokenizer, backend_tokenizer
from serving.engine.scheduler import Scheduler, SchedulerOutput
from serving.engine.sequence import Request, Sequence, SequenceStatus
from serving.sampling_params import SamplingParams

BS = 16


@pytest.fixture(scope="module")
def make_seq(tiny_chat_dir: Path):
    backend = backend_tokenizer(AutoTokenizer.from_pretrained(tiny_chat_dir))
    counter = iter(range(10**6))

    def make(tokens: list[int], max_tokens: int = 16) -> Sequence:
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        request = Request(str(next(counter)), None, tokens, params)
        seq = Sequence(request, 0, IncrementalDetokenizer(backend, tokens, []))
        request.seqs.append(seq)
        return seq

    return make


def computed(bm: BlockManager, seq: Sequence, num_tokens: int) -> None:
    seq.num_computed_tokens = num_tokens
    bm.register(seq)


def test_ref_counts_and_free(make_seq):
    bm = BlockManager(10, BS, enable_prefix_caching=True)
    seq = make_seq(list(range(3, 43)))
    assert bm.admit(seq, token_budget=100) == 40
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 7
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    bm.free(seq)
    assert bm.num_free_blocks == 10 and seq.block_table == []


def test_admit_changes_nothing_when_blocks_run_short(make_seq):
    bm = BlockManager(2, BS, enable_prefix_caching=True)
    seq = make_seq(list(range(3, 43)))
    assert bm.admit(seq, token_budget=100) == 0
    assert bm.num_free_blocks == 2 and seq.block_table == [] and seq.num_computed_tokens == 0
    # A smaller budget (a prompt chunk) fits.
    assert bm.admit(seq, token_budget=32) == 32 and len(seq.block_table) == 2


def test_prefix_blocks_are_shared_and_survive_their_owner(make_seq):
    bm = BlockManager(10, BS, enable_prefix_caching=True)
    a = make_seq(list(range(3, 43)))                      # 40 tokens: 2 full blocks + 8
    bm.admit(a, 100)
    computed(bm, a, 40)
    b = make_seq(list(range(3, 35)) + [900, 901, 902])   # same first 32 tokens
    assert bm.admit(b, 100) == 3
    assert b.num_computed_tokens == 32 and b.block_table[:2] == a.block_table[:2]
    shared = a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in shared] == [2, 2]
    assert bm.prefix_cache_hits == 32 and bm.prefix_cache_queries == 40 + 35
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in shared] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 10
    # Freed but still cached: a third sequence revives the blocks.
    c = make_seq(list(range(3, 36)))
    bm.admit(c, 100)
    assert c.num_computed_tokens == 32 and c.block_table[:2] == shared


def test_the_last_token_is_always_computed(make_seq):
    bm = BlockManager(10, BS, enable_prefix_caching=True)
    a = make_seq(list(range(3, 35)))                      # exactly 2 blocks
    bm.admit(a, 100)
    computed(bm, a, 32)
    twin = make_seq(list(range(3, 35)))
    assert bm.admit(twin, 100) == 16 and twin.num_computed_tokens == 16


def test_only_full_computed_blocks_are_cached(make_seq):
    bm = BlockManager(10, BS, enable_prefix_caching=True)
    a = make_seq(list(range(3, 43)))
    bm.admit(a, 100)
    computed(bm, a, 20)                                   # one full block computed so far
    b = make_seq(list(range(3, 43)))
    bm.admit(b, 100)
    assert b.num_computed_tokens == 16


def test_eviction_takes_uncached_blocks_first_then_least_recently_freed(make_seq):
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    a = make_seq(list(range(3, 43)))                      # blocks: full, full, partial
    bm.admit(a, 100)
    computed(bm, a, 40)
    full_blocks, partial = a.block_table[:2], a.block_table[2]
    bm.free(a)
    small = make_seq([5, 6, 7])
    bm.admit(small, 100)
    assert small.block_table == [partial]
    assert all(bm.blocks[b].hash is not None for b in full_blocks)
    # Needing every block evicts the cached ones; their prefix no longer hits afterwards.
    big = make_seq(list(range(500, 548)))
    assert bm.admit(big, 100) == 48
    bm.free(big)
    bm.free(small)
    again = make_seq(list(range(3, 43)))
    bm.admit(again, 100)
    assert again.num_computed_tokens == 0


def test_prefix_caching_disabled(make_seq):
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    a = make_seq(list(range(3, 43)))
    bm.admit(a, 100)
    computed(bm, a, 40)
    b = make_seq(list(range(3, 43)))
    bm.admit(b, 100)
    assert b.num_computed_tokens == 0 and bm.prefix_cache_hits == 0


def run_step(scheduler: Scheduler, out: SchedulerOutput) -> list[Sequence]:
    """Pretend the model ran: the scheduled tokens are computed; sequences at their end sample token 7."""
    for seq, n in zip(out.seqs, out.num_new_tokens):
        assert seq.num_computed_tokens + n <= seq.num_tokens
        assert len(seq.block_table) * BS >= seq.num_computed_tokens + n
        seq.num_computed_tokens += n
        scheduler.block_manager.register(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
            if seq.num_output_tokens >= seq.request.params.max_tokens:
                seq.finish("length")
    scheduler.remove_finished()
    return out.seqs


def test_chunked_prefill_respects_the_token_budget(make_seq):
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=64, block_manager=BlockManager(64, BS, True))
    seq = make_seq(list(range(3, 153)), max_tokens=3)    # 150-token prompt
    scheduler.add(seq)
    chunks = []
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        chunks.append(out.num_new_tokens[0])
        run_step(scheduler, out)
    assert chunks == [64, 64, 22, 1, 1]
    assert scheduler.block_manager.num_free_blocks == 64


def test_decodes_go_first_and_prefills_lead_the_batch(make_seq):
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=40, block_manager=BlockManager(64, BS, True))
    old = [make_seq([3, 4, 5]), make_seq([6, 7, 8, 9])]
    for seq in old:
        scheduler.add(seq)
    run_step(scheduler, scheduler.schedule())             # both prefilled, both now decoding
    newcomer = make_seq(list(range(100, 200)))
    scheduler.add(newcomer)
    out = scheduler.schedule()
    # Decodes are served first (1 token each), the newcomer's chunk gets the rest of the budget and,
    # having several tokens, leads the flat batch.
    assert out.seqs == [newcomer, *old] and out.num_new_tokens == [38, 1, 1] and out.num_prefill_seqs == 1


def test_max_num_seqs_caps_the_running_set(make_seq):
    bm = BlockManager(64, BS, enable_prefix_caching=True)
    scheduler = Scheduler(max_num_seqs=2, max_num_batched_tokens=256, block_manager=bm)
    seqs = [make_seq([3 + i, 4, 5]) for i in range(5)]
    for seq in seqs:
        scheduler.add(seq)
    out = scheduler.schedule()
    assert out.seqs == seqs[:2] and len(scheduler.waiting) == 3


def test_preemption_evicts_the_newest_and_requeues_it_first(make_seq):
    bm = BlockManager(4, BS, enable_prefix_caching=False)
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=256, block_manager=bm)
    old, new = make_seq(list(range(3, 35)), max_tokens=40), make_seq(list(range(40, 72)), max_tokens=40)
    late = make_seq([9, 9, 9])
    for seq in (old, new, late):
        scheduler.add(seq)
    run_step(scheduler, scheduler.schedule())             # old and new take 2 blocks each; late waits
    assert scheduler.running == [old, new] and list(scheduler.waiting) == [late]
    out = scheduler.schedule()                           # old needs a third block: new must go
    assert out.seqs == [old] and scheduler.num_preemptions == 1
    assert list(scheduler.waiting) == [new, late]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert new.num_tokens == 33                          # its sampled token is kept for the recompute


def test_random_workload_finishes_and_frees_everything(make_seq):
    rng = random.Random(0)
    bm = BlockManager(40, BS, enable_prefix_caching=True)
    scheduler = Scheduler(max_num_seqs=6, max_num_batched_tokens=96, block_manager=bm)
    shared = [rng.randrange(3, 999) for _ in range(48)]
    seqs = []
    for _ in range(30):
        own = [rng.randrange(3, 999) for _ in range(rng.randint(1, 150))]
        prompt = (shared if rng.random() < 0.5 else []) + own
        seqs.append(make_seq(prompt, max_tokens=rng.randint(1, 60)))
    for seq in seqs:
        scheduler.add(seq)
    steps = 0
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        assert sum(out.num_new_tokens) <= 96 and len(scheduler.running) <= 6
        run_step(scheduler, out)
        steps += 1
        assert steps < 5000
    assert all(seq.finished and seq.num_output_tokens == seq.request.params.max_tokens for seq in seqs)
    assert bm.num_free_blocks == 40 and all(b.ref_count == 0 for b in bm.blocks)
    assert scheduler.num_preemptions > 0 and bm.prefix_cache_hits > 0
