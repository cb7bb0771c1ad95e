"""A conversation as token ids under the model's chat template (shared by the engine and the HTTP tier).

Message content is text. Rendering the template and tokenizing the result with special-token parsing
would turn a `</s><s>` inside a message (say, in a retrieved document) into real end/start-of-turn
tokens, forging turn boundaries. So the template emits its control tokens as unguessable sentinels (its
`bos_token`/`eos_token` variables, and any special token written literally in the template), and the text
is tokenized by a copy of the tokenizer whose special tokens match only those sentinels: the template's
control tokens come out exactly as before, while a special token's text inside content is tokenized as
plain text (as `split_special_tokens=True` would). For content without such text the ids are identical to
rendering and encoding the plain way.

(Llama 2's `[INST]` markers are plain text in its vocabulary, so the same text in content is the same
tokens; that is the template's design, not something a tokenizer can tell apart.)
"""
from __future__ import annotations

import json
import secrets
import threading

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

_NONCE = secrets.token_hex(12)


class _ChatEncoder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        data = json.loads(tokenizer.backend_tokenizer.to_str())
        sentinel_of: dict[str, str] = {}
        original_id: dict[str, int] = {}
        for added in data.get("added_tokens", []):
            if added.get("special"):
                sentinel = f"\uf8ff{_NONCE}-{added['id']}\uf8ff"
                sentinel_of[added["content"]] = sentinel
                original_id[sentinel] = added["id"]
                added["content"] = sentinel
        self._backend = Tokenizer.from_str(json.dumps(data))
        # The copy may number the renamed tokens anew; map them back to the model's ids.
        self._ids = {self._backend.token_to_id(s): i for s, i in original_id.items()}
        template = tokenizer.chat_template
        # Longest first, so a token that contains another is replaced whole.
        for text in sorted(sentinel_of, key=len, reverse=True):
            template = template.replace(text, sentinel_of[text])
        self._template = template
        self._variables = {name: sentinel_of[value] for name, value in tokenizer.special_tokens_map.items()
                           if isinstance(value, str) and value in sentinel_of}
        self._tokenizer = tokenizer

    def encode(self, conversation: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        text = self._tokenizer.apply_chat_template(
            conversation, chat_template=self._template, tokenize=False,
            add_generation_prompt=add_generation_prompt, **self._variables)
        # The template writes the BOS token itself.
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self._ids.get(i, i) for i in ids]


_encoders: dict[int, tuple[PreTrainedTokenizerBase, _ChatEncoder]] = {}
_lock = threading.Lock()


def encode_conversation(tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, str]],
                        add_generation_prompt: bool = True) -> list[int]:
    """Render `conversation` ([{"role", "content"}], already validated) and tokenize it, content as text.

    Raises jinja2.TemplateError when the template refuses the conversation (e.g. roles must alternate).
    """
    with _lock:
        entry = _encoders.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer:
            # A process holds one or two tokenizers; the entry keeps it alive, so its id stays its own.
            entry = _encoders[id(tokenizer)] = (tokenizer, _ChatEncoder(tokenizer))
    return entry[1].encode(conversation, add_generation_prompt)
