"""What every endpoint's answer shares: server-sent event streams, usage, the completion log line."""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from serving.api.errors import APIError, error_body
from serving.api.generation import GenerationJob
from serving.api.protocol import Usage

logger = logging.getLogger(__name__)


def sse_response(payloads: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(sse_events(payloads), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def sse_events(payloads: AsyncIterator[str]) -> AsyncIterator[str]:
    """Server-sent events ending in `[DONE]`; a failure after the status line was sent (a replica died
    mid-stream) becomes a final `error` event, which OpenAI clients raise as an error."""
    try:
        async for payload in payloads:
            yield f"data: {payload}\n\n"
    except APIError as exc:
        logger.warning("stream ended by error %s", exc.code)
        yield f"data: {_json(exc.to_dict())}\n\n"
        return
    except Exception as exc:  # noqa: BLE001 (the status line is gone: the client learns it from the stream)
        # The type only: an exception's text can carry request content.
        logger.error("stream ended by an internal error %s", type(exc).__name__)
        yield f"data: {_json(error_body(500, 'internal server error', 'internal_error'))}\n\n"
        return
    yield "data: [DONE]\n\n"


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def usage_of(job: GenerationJob) -> Usage:
    return Usage.of(job.prompt_tokens, job.completion_tokens)


def log_done(request: Request, job: GenerationJob) -> None:
    logger.info("generation done id=%s key=%s prompts=%d prompt_tokens=%d completion_tokens=%d",
                job.request_id, request.state.key.name, len(job.prompts), job.prompt_tokens, job.completion_tokens)
