"""OpenAI-compatible endpoints: models, completions, chat completions, embeddings (and tokenize)."""
from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from serving.api.backends import EmbeddingBackend
from serving.api.context import ApiContext
from serving.api.errors import APIError, bad_request
from serving.api.generation import Event, GenerationJob, encode_chat, encode_text, primed
from serving.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    new_id,
    now,
)
from serving.embeddings import check_inputs

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
    yield "data: [DONE]\n\n"


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


async def _prompt_ids(ctx: ApiContext, body: CompletionRequest) -> list[list[int]]:
    prompt = body.prompt
    tokenizer = ctx.llm_for(body.model).info.tokenizer
    if isinstance(prompt, str):
        return [await encode_text(tokenizer, prompt)]
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if len(prompt) > ctx.settings.max_prompts_per_request:
        raise bad_request(f"{len(prompt)} prompts in one request; at most {ctx.settings.max_prompts_per_request}")
    if isinstance(prompt[0], str):
        return [await encode_text(tokenizer, p) for p in prompt]
    return [list(p) for p in prompt]


def build_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> ModelList:
        cards = []
        if ctx.llm is not None:
            cards.append(ModelCard(id=ctx.llm.info.name, created=now(), max_model_len=ctx.llm.info.max_model_len))
        if ctx.embedder is not None:
            cards.append(ModelCard(id=ctx.embedder.info.name, created=now(),
                                   max_model_len=ctx.embedder.info.max_input_tokens))
        return ModelList(data=cards)

    @router.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Completion | StreamingResponse:
        llm = ctx.llm_for(body.model)
        job = GenerationJob(llm, ctx.metrics, request.state.key, await _prompt_ids(ctx, body), body.max_tokens,
                            ctx.settings.default_max_tokens, body.sampling_kwargs(), body.n)
        await job.admit(ctx.limiter)
        rid, created = new_id("cmpl"), now()
        if not body.stream:
            await job.run()
            log_done(request, job)
            return Completion(id=rid, created=created, model=llm.info.name, usage=usage_of(job), choices=[
                CompletionChoice(index=i, text="".join(c.text), finish_reason=c.finish_reason)
                for i, c in enumerate(job.choices)])
        events = await primed(job.events())

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return Completion(id=rid, created=created, model=llm.info.name, choices=choices,
                              usage=usage).model_dump_json()

        async def payloads() -> AsyncIterator[str]:
            async for ev in events:
                if ev.text or ev.finish_reason:
                    yield chunk([CompletionChoice(index=ev.index, text=ev.text, finish_reason=ev.finish_reason)],
                                usage_of(job) if body.continuous_usage else None)
            log_done(request, job)
            if body.include_usage:
                yield chunk([], usage_of(job))

        return sse_response(payloads())

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | StreamingResponse:
        llm = ctx.llm_for(body.model)
        prompt = await encode_chat(llm.info.tokenizer, body.messages)
        job = GenerationJob(llm, ctx.metrics, request.state.key, [prompt], body.requested_max_tokens,
                            ctx.settings.default_max_tokens, body.sampling_kwargs(), body.n)
        await job.admit(ctx.limiter)
        rid, created = new_id("chatcmpl"), now()
        if not body.stream:
            await job.run()
            log_done(request, job)
            return ChatCompletion(id=rid, created=created, model=llm.info.name, usage=usage_of(job), choices=[
                ChatChoice(index=i, message=AssistantMessage(content="".join(c.text)), finish_reason=c.finish_reason)
                for i, c in enumerate(job.choices)])
        events = await primed(job.events())

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return ChatCompletionChunk(id=rid, created=created, model=llm.info.name, choices=choices,
                                       usage=usage).model_dump_json()

        def delta(ev: Event) -> list[ChatChunkChoice]:
            out = []
            if ev.text:
                out.append(ChatChunkChoice(index=ev.index, delta=ChatDelta(content=ev.text)))
            if ev.finish_reason:
                out.append(ChatChunkChoice(index=ev.index, delta=ChatDelta(), finish_reason=ev.finish_reason))
            return out

        async def payloads() -> AsyncIterator[str]:
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                         for i in range(len(job.choices))])
            async for ev in events:
                for choice in delta(ev):
                    yield chunk([choice], usage_of(job) if body.continuous_usage else None)
            log_done(request, job)
            if body.include_usage:
                yield chunk([], usage_of(job))

        return sse_response(payloads())

    @router.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
        embedder = ctx.embedder_for(body.model)
        if body.dimensions is not None and body.dimensions != embedder.info.dimensions:
            raise bad_request(f"{embedder.info.name} gives {embedder.info.dimensions} dimensions; "
                              f"dimensions={body.dimensions} is not supported")
        texts = [body.input] if isinstance(body.input, str) else body.input
        vectors, tokens = await embed(ctx, embedder, request, texts)
        # base64 is what the openai client asks for by default: the raw little-endian float32 bytes.
        data = [EmbeddingData(index=i, embedding=base64.b64encode(v.tobytes()).decode()
                              if body.encoding_format == "base64" else v.tolist())
                for i, v in enumerate(vectors)]
        return EmbeddingResponse(model=embedder.info.name, usage=Usage.of(tokens, 0), data=data)

    @router.post("/v1/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        llm = ctx.llm_for(body.model)
        if body.prompt is not None:
            ids = await encode_text(llm.info.tokenizer, body.prompt)
        else:
            ids = await encode_chat(llm.info.tokenizer, body.messages, body.add_generation_prompt)
        return TokenizeResponse(count=len(ids), max_model_len=llm.info.max_model_len, tokens=ids)

    return router


async def embed(ctx: ApiContext, embedder: EmbeddingBackend, request: Request,
                texts: list[str]) -> tuple[np.ndarray, int]:
    """Count, check, charge and embed `texts` (for the embeddings and the predict endpoint)."""
    counts = [len(ids) for ids in embedder.info.tokenizer(texts, add_special_tokens=True)["input_ids"]]
    try:
        check_inputs(counts, embedder.info.max_input_tokens)
    except ValueError as exc:
        raise bad_request(str(exc), "invalid_input") from None
    await ctx.limiter.acquire(request.state.key, sum(counts))
    vectors, tokens = await embedder.embed(texts)
    logger.info("embeddings key=%s inputs=%d tokens=%d", request.state.key.name, len(texts), tokens)
    return vectors, tokens


def usage_of(job: GenerationJob) -> Usage:
    return Usage.of(job.prompt_tokens, job.completion_tokens)


def log_done(request: Request, job: GenerationJob) -> None:
    logger.info("generation done id=%s key=%s prompts=%d prompt_tokens=%d completion_tokens=%d",
                job.request_id, request.state.key.name, len(job.prompts), job.prompt_tokens, job.completion_tokens)
