"""Engine errors that callers (the HTTP tier, the offline API) map to their own responses."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class EngineDeadError(RuntimeError):
    """The engine loop died (an exception inside a step) or was shut down; it serves no more requests."""


class EngineStalledError(RuntimeError):
    """The engine loop has had work but made no step for longer than its stall timeout."""


class RequestTooLargeError(ValueError):
    """The request needs more KV-cache blocks than the whole pool holds, so it could never run."""


class RequestFailedError(RuntimeError):
    """One request made the engine step raise; the engine removed it and serves the others on."""


class ErrorKind(str, Enum):
    """Why a replica could not serve a request; the HTTP layer picks the status (serving/api/backends.py)."""

    OVERLOADED = "overloaded"          # the replica's queue is full: retry later or elsewhere
    UNAVAILABLE = "unavailable"        # the engine is down and the replica is being replaced: retry elsewhere
    FAILED = "failed"                  # the request made the engine fail: the same request fails anywhere
    INVALID = "invalid"                # a bad value in the request
    CONTEXT_WINDOW = "context_window"  # prompt + max_tokens exceed the context window (ContextWindowError)


@dataclass(frozen=True)
class ErrorResult:
    """A failed request as a value: replicas return (or stream, as the last item) this instead of raising,
    since Ray logs an exception raised by a replica method at ERROR with its traceback."""

    kind: ErrorKind
    message: str


class PromptError(ValueError):
    """A prompt or conversation the model cannot take; the message names the field."""


class InvalidMessagesError(PromptError):
    """The chat template refused the conversation (e.g. roles that do not alternate)."""


class ContextWindowError(PromptError):
    """Prompt tokens plus max_tokens exceed the context window (the message gives both numbers)."""
