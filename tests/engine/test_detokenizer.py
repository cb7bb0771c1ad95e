"""Incremental detokenisation on the tiny sentencepiece tokenizer: spaces, multi-byte characters, stops."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from serving.engine.detokenizer import IncrementalDetokenizer, backend_tokenizer

TEXT = "Hello world, héllo 日本語 ✓  double  spaces\nnew line\n\n  indented. Ünïcödé — “quotes” 😀 end"


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_chat_dir)


def stream(tokenizer, prompt: list[int], output: list[int], stop: list[str] | None = None, min_tokens: int = 0):
    detok = IncrementalDetokenizer(backend_tokenizer(tokenizer), prompt, stop or [], min_tokens)
    pieces = []
    stopped = False
    for i, token_id in enumerate(output):
        stopped = detok.add_token(token_id)
        if stopped or i == len(output) - 1:
            stopped = stopped or detok.flush()
            pieces.append(detok.take_delta(finished=True))
            break
        pieces.append(detok.take_delta(finished=False))
    return detok, pieces, stopped


def test_streamed_text_equals_full_decode(tokenizer):
    prompt = tokenizer.encode("Say something:")
    output = tokenizer.encode(TEXT, add_special_tokens=False)
    assert any(tokenizer.convert_ids_to_tokens(t).startswith("<0x") for t in output), "needs byte-fallback"
    detok, pieces, _ = stream(tokenizer, prompt, output)
    full = tokenizer.decode(prompt + output, skip_special_tokens=True)
    expected = full[len(tokenizer.decode(prompt, skip_special_tokens=True)):]
    assert "".join(pieces) == detok.text == expected
    assert expected.startswith(" Hello")          # the first token's space survives
    assert all("\ufffd" not in piece for piece in pieces)


def test_random_tokens_never_raise_and_stay_consistent(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        prompt = [1] + [rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(1, 20))]
        output = [rng.randrange(0, len(tokenizer)) for _ in range(rng.randint(1, 60))]
        detok, pieces, _ = stream(tokenizer, prompt, output)
        assert "".join(pieces) == detok.text


def test_stop_string_cuts_and_streamed_pieces_add_up(tokenizer):
    prompt = tokenizer.encode("Q:")
    output = tokenizer.encode("one two three four five", add_special_tokens=False)
    detok, pieces, stopped = stream(tokenizer, prompt, output, stop=["ee fo", "zzz"])
    assert stopped and detok.text == " one two thr"
    assert "".join(pieces) == detok.text
    # "three" ends in "ee", a possible start of the stop string: it was held back, never streamed.
    assert not any("ee" in piece for piece in pieces)


def test_stop_string_spanning_many_tokens_is_held_back_until_decided(tokenizer):
    prompt = tokenizer.encode("Q:")
    output = tokenizer.encode("alpha beta gamma", add_special_tokens=False)
    detok, pieces, stopped = stream(tokenizer, prompt, output, stop=["beta gamma delta"])
    # Never matched: everything comes out in the end, and nothing was emitted twice.
    assert not stopped and "".join(pieces) == detok.text == " alpha beta gamma"


def cut_after_min_tokens(text: str, stop: str, prefix_len: int) -> int | None:
    """Where one stop string cuts `text` when matches within its first `prefix_len` characters (the first
    min_tokens tokens' text) do not count: the first match that ends past them, or None."""
    return next((i for i in range(len(text) - len(stop) + 1)
                 if text.startswith(stop, i) and i + len(stop) > prefix_len), None)


def test_min_tokens_ignores_stop_strings_in_the_first_tokens(tokenizer):
    prompt = tokenizer.encode("Q:")
    output = tokenizer.encode("one two three four five", add_special_tokens=False)
    full, _, _ = stream(tokenizer, prompt, output)
    # "e " spans tokens ("▁one" + "▁two"): with min_tokens=1 it starts in an ignored token and ends after.
    stop = "e "
    cuts = set()
    for min_tokens in range(len(output) + 1):
        prefix, _, _ = stream(tokenizer, prompt, output[:min_tokens]) if min_tokens else (None, None, None)
        cut = cut_after_min_tokens(full.text, stop, len(prefix.text) if prefix else 0)
        detok, pieces, stopped = stream(tokenizer, prompt, output, [stop], min_tokens)
        assert stopped == (cut is not None), min_tokens
        assert detok.text == full.text[:cut] == "".join(pieces), min_tokens
        cuts.add(cut)
    assert len(cuts) >= 3   # the stop at "one", at "three", never


def _held_back_brute_force(text: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def test_held_back_tail_matches_brute_force_on_repetitive_text():
    """The incremental (KMP) hold-back equals the definition: the longest suffix that starts a stop string.
    Small alphabets and self-overlapping stops are where a wrong failure function shows."""
    rng = random.Random(8)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(1, 3))]
        matcher = IncrementalDetokenizer(_FakeBackend(), [], stops)
        text = ""
        for _ in range(rng.randint(1, 30)):
            chunk = "".join(rng.choice("abc") for _ in range(rng.randint(1, 3)))
            if any(s in text + chunk for s in stops):
                break
            text += chunk
            matcher.text = text
            assert matcher._pending_stop_prefix() == _held_back_brute_force(text, stops), (text, stops)


class _FakeBackend:
    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""
