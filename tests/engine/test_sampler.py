"""The batched sampler: greedy, temperature, top-k / top-p, seeded rows and logprobs."""
from __future__ import annotations

import pytest
import torch

from serving.engine.penalty_slots import PenaltySlots
from serving.engine.sequence import Request, Sequence
from serving.layers.penalty_counts import PenaltyCounts
from serving.layers.sampler import Sampler, SamplingTensors, process_logits
from serving.sampling_params import SamplingParams

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


def uploads(slots: dict[int, tuple[list[int], list[int]]], num_slots: int,
            counted: dict[int, int] | None = None) -> dict:
    """SamplingTensors penalty fields for penalty rows in the order of `slots` {slot: (prompt, generated)}:
    a slot in `counted` (generated tokens it already counted) uploads its generated tokens from there on;
    any other is reset and uploads its prompt and all its generated tokens."""
    counted = counted or {}
    fresh = [slot for slot in slots if slot not in counted]
    entries = [(slot, pos, token) for slot, (_, generated) in slots.items() for pos, token in enumerate(generated)
               if pos >= counted.get(slot, 0)]

    def ids(values) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.int64)

    fields = dict(num_penalty_slots=num_slots, penalty_slots=ids(slots))
    if fresh:
        fields.update(reset_slots=ids(fresh), prompt_slots=ids(s for s in fresh for _ in slots[s][0]),
                      prompt_ids=ids(t for s in fresh for t in slots[s][0]))
    if entries:
        fields.update(zip(("count_slots", "count_positions", "count_ids"), map(ids, zip(*entries))))
    return fields


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
    seen = {1: [], 3: [11, 11, 9]}
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    bitmask[0, 0] = (1 << 3) | (1 << 30)                 # only tokens 3 and 30 allowed
    t = SamplingTensors(
        num_logprobs=0,
        mask_rows=torch.tensor([2]), token_bitmask=bitmask,
        bias_rows=torch.tensor([0, 0]), bias_ids=torch.tensor([5, 6]), bias_values=torch.tensor([50.0, -float("inf")]),
        penalty_rows=torch.tensor([1, 3]), presence=torch.tensor([0.5, 0.0]), frequency=torch.tensor([1.5, 0.0]),
        repetition=torch.tensor([1.0, 1.7]),
        # Row 3's prompt is [11, 11]: it has seen its prompt and its output.
        **uploads({2: ([], out_tokens[1]), 0: ([11, 11], out_tokens[3])}, num_slots=3),
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


def test_penalty_counts_kept_on_the_device_equal_a_rebuild(logits):
    """Step by step, uploading only the new tokens, re-sending some (a step re-run after a failure) and
    handing a finished sequence's slot to a new one gives exactly the logits of counts built from scratch."""
    rng = torch.Generator().manual_seed(5)
    rows = torch.tensor([1, 4, 6])
    knobs = dict(presence=torch.tensor([0.5, 0.0, 1.0]), frequency=torch.tensor([1.5, 0.3, 0.0]),
                 repetition=torch.tensor([1.3, 1.0, 2.0]))
    histories = {2: ([1, 2, 2], []), 0: ([5], [5]), 3: ([7, 8], [])}   # slot -> (prompt, generated)
    kept = PenaltyCounts(4, V, torch.device("cpu"))
    counted: dict[int, int] = {}
    for step in range(16):
        if step == 9:   # slot 0's sequence finished; a new one takes the slot
            histories[0] = ([3, 3, 4], [])
            del counted[0]
        resent = {slot: max(0, n - 2) for slot, n in counted.items()} if step % 5 == 4 else counted
        t = SamplingTensors(penalty_rows=rows, **knobs, **uploads(histories, 4, resent))
        kept.update(t)
        rebuilt = PenaltyCounts(4, V, torch.device("cpu"))
        t_rebuilt = SamplingTensors(penalty_rows=rows, **knobs, **uploads(histories, 4))
        rebuilt.update(t_rebuilt)
        assert torch.equal(process_logits(logits.clone(), t, kept), process_logits(logits.clone(), t_rebuilt, rebuilt))
        counted = {slot: len(generated) for slot, (_, generated) in histories.items()}
        for _, generated in histories.values():
            generated.append(int(torch.randint(0, 12, (1,), generator=rng)))   # small range: repeats
    generated = kept.generated(torch.tensor([2]))[0]
    assert generated.sum().item() == len(histories[2][1]) - 1   # the last token was not uploaded yet


def test_penalty_slots_upload_only_what_the_device_lacks():
    def seq(request_id: str, prompt: list[int]) -> Sequence:
        return Sequence(Request(request_id, None, prompt, SamplingParams(repetition_penalty=1.2)), 0, None)

    def listed(fields: dict) -> dict:
        return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in fields.items()}

    slots = PenaltySlots(2)
    a = seq("a", [1, 2, 3])
    assert listed(slots.tensors([a])) == {"num_penalty_slots": 2, "penalty_slots": [0], "reset_slots": [0],
                                          "prompt_slots": [0, 0, 0], "prompt_ids": [1, 2, 3]}
    slots.commit()
    a.token_ids.append(7)
    sent = {"num_penalty_slots": 2, "penalty_slots": [0], "count_slots": [0], "count_positions": [0],
            "count_ids": [7]}
    assert listed(slots.tensors([a])) == sent
    # That step did not sample (it raised); one without penalties does: the token is still owed.
    assert slots.tensors([]) == {}
    slots.commit()
    assert listed(slots.tensors([a])) == sent
    slots.commit()
    a.token_ids.append(8)
    assert listed(slots.tensors([a]))["count_ids"] == [8]
    slots.commit()
    # Two more sequences: the least recently scheduled holder (a) gives its slot up, and later uploads its
    # whole history again into a fresh one.
    b, c = seq("b", [4]), seq("c", [5])
    assert listed(slots.tensors([b]))["penalty_slots"] == [1]
    slots.commit()
    assert listed(slots.tensors([c]))["reset_slots"] == [0]
    slots.commit()
    again = listed(slots.tensors([a]))
    assert again["reset_slots"] == again["penalty_slots"] == [1] and again["prompt_ids"] == [1, 2, 3]
    assert again["count_positions"] == [0, 1] and again["count_ids"] == [7, 8]
