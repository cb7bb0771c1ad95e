"""A prompt as token ids, and whether it fits: raw text, a conversation under the model's chat template, the
chat roles, the context-window check. One module for the engine (offline `LLM`) and the HTTP tier, so both
encode the same ids and refuse with the same messages (ValueError subclasses of serving/engine/errors.py).

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
from typing import TYPE_CHECKING, Any, Literal, get_args

from jinja2 import TemplateError
from tokenizers import Tokenizer

from serving.engine.errors import ContextWindowError, InvalidMessagesError, PromptError
from serving.limits import LIMITS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ChatRole = Literal["system", "user", "assistant"]
CHAT_ROLES: tuple[str, ...] = get_args(ChatRole)

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


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, field: str = "prompt") -> list[int]:
    """Token ids of a raw prompt, with the BOS token."""
    if not prompt:
        raise PromptError(f"{field} is empty")
    if len(prompt) > LIMITS.text_chars:
        raise PromptError(f"{field} has {len(prompt)} characters; at most {LIMITS.text_chars}")
    _check_text(prompt, field)
    return tokenizer.encode(prompt, add_special_tokens=True)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation ([{"role", "content": str}]) under the model's chat template, by default
    ready for the assistant's turn. Raises PromptError naming the field (InvalidMessagesError when the
    template refuses the conversation, e.g. roles that do not alternate)."""
    if not isinstance(messages, list) or not messages or len(messages) > LIMITS.messages:
        raise PromptError(f"messages must be a list of 1 to {LIMITS.messages} {{'role', 'content'}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise PromptError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise PromptError(f"messages[{i}].content must be a string")
        _check_text(message["content"], f"messages[{i}].content")
    if not tokenizer.chat_template:
        raise PromptError("this model has no chat template; send a raw prompt (/v1/completions)")
    try:
        return _encode_conversation(tokenizer, messages, add_generation_prompt)
    except TemplateError as exc:
        # The template's own message (e.g. roles must alternate) names no content.
        raise InvalidMessagesError(f"invalid messages: {exc}") from None


def check_context_window(prompt_tokens: int, max_tokens: int | None, window: int, which: str = "prompt") -> None:
    """Raise ContextWindowError unless the prompt and `max_tokens` generated tokens fit in `window`.

    `max_tokens=None` (the caller sizes it to what is left): at least one token must fit. `max_tokens=0`
    (scoring the prompt) still samples one token, so it needs room for one too.
    """
    needed = prompt_tokens + max(max_tokens or 0, 1)
    if needed > window:
        asked = "at least 1" if max_tokens is None else str(max_tokens)
        raise ContextWindowError(f"{which} has {prompt_tokens} tokens and max_tokens is {asked}: {needed} exceeds "
                                 f"the context window of {window} tokens (max_model_len)")


def _check_text(text: str, field: str) -> None:
    """The tokenizer takes valid Unicode only: a lone surrogate (JSON allows "\\ud800") would make it raise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(f"{field} is not valid Unicode (a lone surrogate at character {exc.start})") from None


def _encode_conversation(tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, str]],
                        add_generation_prompt: bool = True) -> list[int]:
    """Render `conversation` (validated) and tokenize it, content as text; jinja2.TemplateError when the
    template refuses it."""
    with _lock:
        entry = _encoders.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer:
            # A process holds one or two tokenizers; the entry keeps it alive, so its id stays its own.
            entry = _encoders[id(tokenizer)] = (tokenizer, _ChatEncoder(tokenizer))
    return entry[1].encode(conversation, add_generation_prompt)
