"""The batched sampler: greedy, temperature, top-k / top-p, seeded rows and logprobs."""
from __future__ import annotations

import pytest
import torch

from serving.layers.sampler import Sampler, SamplingTensors

V = 50


def sampling(num_rows: int, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seeds: list[int] | None = None, steps: list[int] | None = None, rows: list[int] | None = None,
             num_logits_rows: int | None = None) -> SamplingTensors:
    rows = list(range(num_rows)) if rows is None else rows
    n = len(rows)
    return SamplingTensors(
        sample_rows=torch.tensor(rows),
        temperature=torch.full((n,), temperature),
        top_k=None if top_k is None else torch.full((n,), top_k),
        top_p=None if top_p is None else torch.full((n,), top_p),
        seeded_rows=None if seeds is None else torch.arange(n),
        seeds=None if seeds is None else torch.tensor(seeds),
        steps=None if seeds is None else torch.tensor(steps or [0] * n),
        all_sampled=n == (num_logits_rows or num_rows),
    )


@pytest.fixture(scope="module")
def logits() -> torch.Tensor:
    return torch.randn(8, V, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_rows_take_the_argmax(logits):
    out = Sampler(torch.device("cpu"), 0)(logits, SamplingTensors())
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_mixed_batch_keeps_greedy_rows_greedy(logits):
    t = sampling(8, rows=[1, 5], num_logits_rows=8, temperature=5.0)
    ids = Sampler(torch.device("cpu"), 0)(logits, t).token_ids
    greedy = logits.argmax(-1)
    keep = [i for i in range(8) if i not in (1, 5)]
    assert torch.equal(ids[keep], greedy[keep])


def test_top_k_1_and_tiny_top_p_equal_greedy(logits):
    sampler = Sampler(torch.device("cpu"), 0)
    greedy = logits.argmax(-1)
    for _ in range(5):
        assert torch.equal(sampler(logits, sampling(8, temperature=2.0, top_k=1)).token_ids, greedy)
        assert torch.equal(sampler(logits, sampling(8, temperature=2.0, top_p=1e-6)).token_ids, greedy)


def test_top_k_and_top_p_restrict_the_support():
    sampler = Sampler(torch.device("cpu"), 0)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (V - 4)) + 1e-9
    logits = probs.log().expand(4000, V).contiguous()
    top2 = sampler(logits, sampling(4000, top_k=2)).token_ids
    assert set(top2.tolist()) == {0, 1}
    # Nucleus 0.6: tokens 0 and 1 (mass before token 2 is 0.7 > 0.6) -- token 2 never.
    nucleus = sampler(logits, sampling(4000, top_p=0.6)).token_ids
    assert set(nucleus.tolist()) == {0, 1}
    both = sampler(logits, sampling(4000, top_k=3, top_p=0.9)).token_ids
    assert set(both.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_samples_follow_the_softmax(seeded, temperature):
    n = 20000
    base = torch.tensor([0.0, 1.0, 2.0, -1.0])
    logits = torch.full((n, V), -1e4)
    logits[:, :4] = base
    t = sampling(n, temperature=temperature, seeds=list(range(n)) if seeded else None)
    ids = Sampler(torch.device("cpu"), 0)(logits, t).token_ids
    freq = torch.bincount(ids, minlength=V)[:4].float() / n
    expected = (base / temperature).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_seeded_rows_ignore_their_neighbours(logits):
    """A seeded row draws the same token whatever row it sits in and whatever else is sampled."""
    sampler = Sampler(torch.device("cpu"), 0)
    row = logits[3:4]
    alone = [sampler(row, sampling(1, seeds=[42], steps=[s])).token_ids.item() for s in range(20)]
    crowd = logits.flip(0).clone()
    crowd[6] = row[0]
    in_crowd = []
    for s in range(20):
        t = sampling(8, seeds=[7, 8, 9, 10, 11, 12, 42, 13], steps=[s] * 8)
        in_crowd.append(sampler(crowd, t).token_ids[6].item())
    assert alone == in_crowd
    other_seed = [sampler(row, sampling(1, seeds=[43], steps=[s])).token_ids.item() for s in range(20)]
    assert other_seed != alone
    # Flat logits: every step of a seeded row draws fresh noise.
    flat = torch.zeros(1, V)
    draws = {sampler(flat, sampling(1, seeds=[42], steps=[s])).token_ids.item() for s in range(20)}
    assert len(draws) > 10


def test_logprobs_are_the_raw_log_softmax(logits):
    t = SamplingTensors(num_logprobs=3)
    out = Sampler(torch.device("cpu"), 0)(logits, t)
    expected = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs.chosen, expected.gather(1, out.token_ids[:, None]).squeeze(1))
    top_lp, top_ids = expected.topk(3)
    assert torch.equal(out.logprobs.top_ids, top_ids) and torch.allclose(out.logprobs.top_logprobs, top_lp)


def test_processing_matches_the_formulas(logits):
    """Rows 1 and 3 penalized (3 with repetition over tokens it saw), row 2 masked by a bitmask, row 0
    biased; greedy picks from the processed logits, logprobs stay raw."""
    out_tokens = {1: [4, 4, 7], 3: [9]}
    seen = {1: [], 3: [9, 11, 11]}
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    bitmask[0, 0] = (1 << 3) | (1 << 30)                 # only tokens 3 and 30 allowed
    t = SamplingTensors(
        num_logprobs=0,
        mask_rows=torch.tensor([2]), token_bitmask=bitmask,
        bias_rows=torch.tensor([0, 0]), bias_ids=torch.tensor([5, 6]), bias_values=torch.tensor([50.0, -float("inf")]),
        penalty_rows=torch.tensor([1, 3]), presence=torch.tensor([0.5, 0.0]), frequency=torch.tensor([1.5, 0.0]),
        output_rows=torch.tensor([0, 0, 0, 1]), output_ids=torch.tensor(out_tokens[1] + out_tokens[3]),
        repetition=torch.tensor([1.0, 1.7]), seen_rows=torch.tensor([1, 1, 1]), seen_ids=torch.tensor(seen[3]),
    )
    out = Sampler(torch.device("cpu"), 0)(logits, t)
    expected = logits.clone()
    expected[0, 5] += 50.0
    expected[0, 6] = -float("inf")
    for token in set(out_tokens[1]):
        count = out_tokens[1].count(token)
        expected[1, token] -= 1.5 * count + 0.5
    for token in set(seen[3]):
        value = expected[3, token]
        expected[3, token] = value * 1.7 if value < 0 else value / 1.7
    allowed = torch.full((V,), -float("inf"))
    allowed[[3, 30]] = 0.0
    expected[2] = expected[2] + allowed
    assert torch.equal(out.token_ids, expected.argmax(-1))
    assert out.token_ids[2].item() in (3, 30) and out.token_ids[0].item() == 5
    assert torch.allclose(out.logprobs.chosen, logits.log_softmax(-1).gather(1, out.token_ids[:, None]).squeeze(1))
