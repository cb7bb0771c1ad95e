"""HTTP errors of the serving tier: one exception type, one JSON shape.

Every error the API returns is `{"error": {"message", "type", "code"}}` with a 4xx/5xx status. The
exception also crosses Ray (an LLM replica raises it, the ingress turns it into a response), so it
pickles by its constructor arguments. Messages never contain prompt or completion text: they end up in
logs and tracebacks.
"""
from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from serving.engine.errors import ContextWindowError, InvalidMessagesError, PromptError

# Seconds a client should wait after a 503 before retrying the same request elsewhere or later.
DEFAULT_RETRY_AFTER_S = 1

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, retry_after: int | None = None):
        super().__init__(status, message, code, retry_after)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.status} {self.code or _TYPES.get(self.status, 'error')}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code)

    def to_response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.to_dict(), status_code=self.status, headers=headers)


def error_body(status: int, message: str, code: str | None = None, error_type: str | None = None) -> dict[str, Any]:
    """The one JSON shape; the type follows the status (any other 4xx is the caller's invalid request)."""
    kind = error_type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "code": code}}


def bad_request(message: str, code: str = "invalid_request") -> APIError:
    return APIError(400, message, code)


def unavailable(message: str, code: str = "unavailable", retry_after: int = DEFAULT_RETRY_AFTER_S) -> APIError:
    return APIError(503, message, code, retry_after)


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
# The engine's input errors that have their own code (any other PromptError is a plain invalid_request).
_PROMPT_CODES = {ContextWindowError: CONTEXT_LENGTH_EXCEEDED, InvalidMessagesError: "invalid_messages"}


def invalid_input(exc: PromptError) -> APIError:
    """The 400 for a prompt the engine's checks refused (serving/engine/prompts.py); the message names the field."""
    return bad_request(str(exc), _PROMPT_CODES.get(type(exc), "invalid_request"))
