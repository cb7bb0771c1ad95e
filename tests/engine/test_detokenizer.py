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


def stream(tokenizer, prompt: list[int], output: list[int], stop: list[str] | None = None):
    detok = IncrementalDetokenizer(backend_tokenizer(tokenizer), prompt, stop or [])
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
