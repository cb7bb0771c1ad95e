"""`mosaic` provider for the MLflow AI Gateway: completions, chat and embeddings on the serving tier."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Generator
from typing import Any, TypeVar

import numpy as np
from fastapi import HTTPException
from mlflow.gateway.config import EndpointConfig
from mlflow.gateway.providers.base import BaseProvider
from mlflow.gateway.schemas import chat, completions, embeddings
from mlflow.gateway.utils import to_sse_chunk
from pydantic import BaseModel, ValidationError
from starlette.responses import StreamingResponse

from mlflow_mosaic_provider.client import MosaicClient, gateway_error
from mlflow_mosaic_provider.config import MosaicConfig
from mlflow_mosaic_provider.limits import endpoint_limits
from mlflow_mosaic_provider.metrics import start_exporter_once
from serving.engine.prompts import CHAT_ROLES

_logger = logging.getLogger(__name__)

# What the serving tier's sampling takes (OpenAI names plus vLLM's top_k, ignore_eos, repetition_penalty,
# min_tokens and guided_*). Not `logprobs`/`top_logprobs`/`echo`: MLflow's response schemas have no place
# for log-probabilities and would drop them, so asking for them here is a 422, not a silent loss.
_SAMPLING = frozenset(
    {
        "n",
        "stop",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "ignore_eos",
        "stream",
        "stream_options",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "min_tokens",
        "response_format",
        "guided_json",
        "guided_regex",
        "guided_choice",
    }
)
_CHAT_FIELDS = _SAMPLING | {"messages"}
_COMPLETION_FIELDS = _SAMPLING | {"prompt"}
_EMBEDDING_FIELDS = frozenset({"input", "encoding_format"})

M = TypeVar("M", bound=BaseModel)


def upstream_body(payload: BaseModel, supported: frozenset[str]) -> dict[str, Any]:
    """The request body for the serving tier; a 422 names every parameter it cannot honour."""
    body = payload.model_dump(mode="json", exclude_none=True)
    if "model" in body:
        raise gateway_error(
            422, "The parameter 'model' is not permitted: the endpoint already defines its model."
        )
    unsupported = sorted(set(body) - supported)
    stream_options = body.get("stream_options") or {}
    unsupported += [f"stream_options.{key}" for key in sorted(set(stream_options) - {"include_usage"})]
    if unsupported:
        raise gateway_error(
            422, f"Unsupported parameter(s) for the mosaic provider: {', '.join(unsupported)}"
        )
    if "max_completion_tokens" in body:
        if "max_tokens" in body:
            raise gateway_error(422, "Give either max_tokens or max_completion_tokens, not both.")
        body["max_tokens"] = body.pop("max_completion_tokens")
    return body


def _chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as role + content (a string or text parts); anything else is a 422."""
    converted = []
    for i, message in enumerate(messages):
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            names = ", ".join(f"messages[{i}].{key}" for key in extra)
            raise gateway_error(422, f"Unsupported parameter(s) for the mosaic provider: {names}")
        if message["role"] not in CHAT_ROLES:
            raise gateway_error(
                422, f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)} (got {message['role']!r})"
            )
        content = message.get("content")
        if content is None:
            raise gateway_error(422, f"messages[{i}].content is required")
        if isinstance(content, list):
            kinds = sorted({part["type"] for part in content} - {"text"})
            if kinds:
                raise gateway_error(
                    422, f"messages[{i}]: content parts of type {', '.join(kinds)} are not supported"
                )
        converted.append({"role": message["role"], "content": content})
    return converted


def _parse(model: type[M], data: dict[str, Any], what: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise gateway_error(
            502, f"the serving tier sent an unexpected {what} ({e.error_count()} schema errors)"
        ) from None


def _usage_tokens(usage: dict[str, Any] | None) -> int:
    if not usage:
        return 0
    total = usage.get("total_tokens")
    if total is None:
        total = (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
    return int(total)


class StreamRelay:
    """A provider stream that FastAPI's route can await and MLflow's routers can iterate.

    MLflow's `make_streaming_response` wraps async generators in a `StreamingResponse`, whose 200
    status goes out before the provider has even connected upstream. Anything else it awaits, so
    awaiting this object pulls the first chunk first: an upstream failure becomes the HTTP status
    of the response; after that, failures can only be reported as an SSE error event.
    """

    def __init__(self, chunks: AsyncIterator[BaseModel]) -> None:
        self._chunks = chunks

    def __aiter__(self) -> AsyncIterator[BaseModel]:
        return self._chunks

    def __await__(self) -> Generator[Any, None, StreamingResponse]:
        return self._respond().__await__()

    async def _respond(self) -> StreamingResponse:
        try:
            first = await anext(self._chunks, None)
        except BaseException:
            await self._chunks.aclose()
            raise
        return StreamingResponse(self._sse(first), media_type="text/event-stream")

    async def _sse(self, first: BaseModel | None) -> AsyncIterator[str]:
        try:
            if first is None:
                return
            # Same framing as MLflow's own streaming routes.
            yield to_sse_chunk(first.model_dump_json())
            async for chunk in self._chunks:
                yield to_sse_chunk(chunk.model_dump_json())
        except HTTPException as e:
            yield to_sse_chunk(
                json.dumps({"error": {"message": e.detail, "type": "upstream_error", "code": e.status_code}})
            )
        except Exception:
            _logger.exception("stream relay failed")
            yield to_sse_chunk(
                json.dumps(
                    {"error": {"message": "internal gateway error", "type": "internal_error", "code": 500}}
                )
            )
        finally:
            await self._chunks.aclose()


class MosaicProvider(BaseProvider):
    """Maps gateway routes onto the serving tier's /v1/completions, /v1/chat/completions, /v1/embeddings."""

    DISPLAY_NAME = "Mosaic"
    CONFIG_TYPE = MosaicConfig
    SUPPORTED_ROUTE_TYPES = ("llm/v1/completions", "llm/v1/chat", "llm/v1/embeddings")

    _PATHS = {
        "llm/v1/completions": "/v1/completions",
        "llm/v1/chat": "/v1/chat/completions",
        "llm/v1/embeddings": "/v1/embeddings",
    }

    def __init__(self, config: EndpointConfig, enable_tracing: bool = False) -> None:
        super().__init__(config, enable_tracing=enable_tracing)
        if not isinstance(config.model.config, MosaicConfig):
            raise TypeError(
                f"the mosaic provider needs a MosaicConfig, got {type(config.model.config).__name__}"
            )
        self.mosaic_config: MosaicConfig = config.model.config
        self._client = MosaicClient(self.mosaic_config, config.name)
        self._limits = endpoint_limits(config.name, self.mosaic_config)
        start_exporter_once()

    def get_endpoint_url(self, route_type: str) -> str:
        if route_type not in self._PATHS:
            raise ValueError(f"Invalid route type {route_type}")
        return self.mosaic_config.api_bases[0] + self._PATHS[route_type]

    # -- non-streaming -------------------------------------------------------------------------

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        body.pop("stream_options", None)
        async with self._limits.admit() as meter:
            answer = await self._client.post_json(path, body)
            meter.tokens = _usage_tokens(answer.get("usage"))
        return answer

    async def _completions(self, payload: completions.RequestPayload) -> completions.ResponsePayload:
        body = {"model": self.config.model.name, **upstream_body(payload, _COMPLETION_FIELDS)}
        answer = await self._call("/v1/completions", body)
        return _parse(completions.ResponsePayload, answer, "completion")

    async def _chat(self, payload: chat.RequestPayload) -> chat.ResponsePayload:
        body = upstream_body(payload, _CHAT_FIELDS)
        body["messages"] = _chat_messages(body["messages"])
        answer = await self._call("/v1/chat/completions", {"model": self.config.model.name, **body})
        return _parse(chat.ResponsePayload, answer, "chat completion")

    async def _embeddings(self, payload: embeddings.RequestPayload) -> embeddings.ResponsePayload:
        body = upstream_body(payload, _EMBEDDING_FIELDS)
        encoding = body.pop("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise gateway_error(422, f"encoding_format must be 'float' or 'base64' (got {encoding!r})")
        answer = await self._call("/v1/embeddings", {"model": self.config.model.name, **body})
        result = _parse(embeddings.ResponsePayload, answer, "embedding")
        if encoding == "base64":
            # The OpenAI SDK asks for base64 by default: little-endian float32, as OpenAI sends it.
            for item in result.data:
                item.embedding = base64.b64encode(np.asarray(item.embedding, dtype="<f4").tobytes()).decode()
        return result

    # -- streaming -----------------------------------------------------------------------------

    async def _relay(self, path: str, body: dict[str, Any], chunk_model: type[M]) -> AsyncIterator[M]:
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        # Always ask for the usage chunk: the token budget is charged from it.
        body = {
            "model": self.config.model.name,
            **body,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with self._limits.admit() as meter:
            chunks = 0
            try:
                async for event in self._client.post_stream(path, body):
                    if event.get("usage"):
                        meter.tokens = _usage_tokens(event["usage"])
                        if not event.get("choices") and not wants_usage:
                            continue
                    chunks += 1
                    yield _parse(chunk_model, event, "stream chunk")
            finally:
                # A client that leaves early never sees the usage chunk; each chunk is about a token.
                if meter.tokens == 0:
                    meter.tokens = chunks

    async def _completions_stream(
        self, payload: completions.RequestPayload
    ) -> AsyncIterator[completions.StreamResponsePayload]:
        body = upstream_body(payload, _COMPLETION_FIELDS)
        async for chunk in self._relay("/v1/completions", body, completions.StreamResponsePayload):
            yield chunk

    async def _chat_stream(self, payload: chat.RequestPayload) -> AsyncIterator[chat.StreamResponsePayload]:
        body = upstream_body(payload, _CHAT_FIELDS)
        body["messages"] = _chat_messages(body["messages"])
        async for chunk in self._relay("/v1/chat/completions", body, chat.StreamResponsePayload):
            yield chunk

    def chat_stream(self, payload: chat.RequestPayload) -> StreamRelay:  # type: ignore[override]
        return StreamRelay(super().chat_stream(payload))

    def completions_stream(  # type: ignore[override]
        self, payload: completions.RequestPayload
    ) -> StreamRelay:
        return StreamRelay(super().completions_stream(payload))
