"""Engine errors that callers (the HTTP tier, the offline API) map to their own responses."""
from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine loop died (an exception inside a step) or was shut down; it serves no more requests."""


class EngineStalledError(RuntimeError):
    """The engine loop has had work but made no step for longer than its stall timeout."""


class RequestTooLargeError(ValueError):
    """The request needs more KV-cache blocks than the whole pool holds, so it could never run."""


class RequestFailedError(RuntimeError):
    """One request made the engine step raise; the engine removed it and serves the others on."""
