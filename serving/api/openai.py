"""OpenAI-compatible endpoints: models, completions, chat completions, embeddings (and tokenize)."""
from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from transformers import PreTrainedTokenizerBase

from serving.api.context import ApiContext
from serving.api.embedding import embed
from serving.api.errors import bad_request
from serving.api.generation import (
    Event,
    GenerationJob,
    encode_chat,
    encode_texts,
    off_loop,
    primed,
)
from serving.api.logprobs import chat_logprobs, completion_logprobs
from serving.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
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
from serving.api.responses import log_done, sse_response, usage_of

T = TypeVar("T")
# Formatting logprobs of more tokens than this runs off the event loop.
_INLINE_LOGPROB_TOKENS = 256


async def _prompt_ids(ctx: ApiContext, body: CompletionRequest) -> list[list[int]]:
    prompt = body.prompt
    tokenizer = ctx.llm_for(body.model).info.tokenizer
    if isinstance(prompt, str):
        return await encode_texts(tokenizer, [prompt])
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if len(prompt) > ctx.settings.max_prompts_per_request:
        raise bad_request(f"{len(prompt)} prompts in one request; at most {ctx.settings.max_prompts_per_request}")
    if isinstance(prompt[0], str):
        return await encode_texts(tokenizer, prompt)
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
        check_supported(body)
        prompts = await _prompt_ids(ctx, body)
        sampling = {**body.sampling_kwargs(), "logprobs": body.logprobs, "guided_decoding": body.guided_decoding()}
        if body.echo and body.logprobs is not None:
            sampling["prompt_logprobs"] = body.logprobs
        job = GenerationJob(llm, ctx.metrics, request.state.key, prompts, body.max_tokens,
                            ctx.settings.default_max_tokens, sampling, body.n)
        await job.admit(ctx.limiter)
        tokenizer = llm.info.tokenizer
        echoed = _prompt_texts(body, prompts, tokenizer) if body.echo else None
        rid, created = new_id("cmpl"), now()

        async def logprobs_of(index: int, token_ids: list[int], entries: list, first: bool,
                              offset: int) -> CompletionLogprobs | None:
            """Logprobs of a choice's new tokens; with echo, the prompt's come first (in its first chunk)."""
            if body.logprobs is None:
                return None
            prompt = prompts[index // body.n]
            if body.echo and first:
                return await _logprobs_off_loop(completion_logprobs, tokenizer, [], prompt + token_ids,
                                                job.prompt_logprobs[index // body.n] + entries, 0)
            history = prompt + job.choices[index].token_ids[:len(job.choices[index].token_ids) - len(token_ids)]
            return await _logprobs_off_loop(completion_logprobs, tokenizer, history, token_ids, entries, offset)

        if not body.stream:
            await job.run()
            log_done(request, job)
            choices = []
            for i, c in enumerate(job.choices):
                prefix = echoed[i // body.n] if echoed else ""
                choices.append(CompletionChoice(index=i, text=prefix + "".join(c.text), finish_reason=c.finish_reason,
                                                logprobs=await logprobs_of(i, c.token_ids, c.logprobs, True, 0)))
            return Completion(id=rid, created=created, model=llm.info.name, usage=usage_of(job), choices=choices)
        events = await primed(job.events())

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return Completion(id=rid, created=created, model=llm.info.name, choices=choices,
                              usage=usage).model_dump_json()

        async def payloads() -> AsyncIterator[str]:
            offsets: dict[int, int] = {}
            async for ev in events:
                first = ev.index not in offsets
                if not (ev.text or ev.finish_reason or ev.token_ids or (first and echoed)):
                    continue
                text = (echoed[ev.prompt_index] if echoed and first else "") + ev.text
                logprobs = await logprobs_of(ev.index, ev.token_ids, ev.logprobs, first, offsets.get(ev.index, 0))
                offsets[ev.index] = offsets.get(ev.index, 0) + (sum(map(len, logprobs.tokens)) if logprobs else 0)
                yield chunk([CompletionChoice(index=ev.index, text=text, finish_reason=ev.finish_reason,
                                              logprobs=logprobs)], usage_of(job) if body.continuous_usage else None)
            log_done(request, job)
            if body.include_usage:
                yield chunk([], usage_of(job))

        return sse_response(payloads())

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | StreamingResponse:
        llm = ctx.llm_for(body.model)
        check_supported(body)
        prompt = await encode_chat(llm.info.tokenizer, body.messages)
        sampling = {**body.sampling_kwargs(), "logprobs": (body.top_logprobs or 0) if body.logprobs else None,
                    "guided_decoding": body.guided_decoding()}
        job = GenerationJob(llm, ctx.metrics, request.state.key, [prompt], body.requested_max_tokens,
                            ctx.settings.default_max_tokens, sampling, body.n)
        await job.admit(ctx.limiter)
        rid, created = new_id("chatcmpl"), now()

        async def logprobs_of(index: int, token_ids: list[int], entries: list) -> ChatLogprobs | None:
            if not body.logprobs:
                return None
            done = job.choices[index].token_ids
            history = prompt + done[:len(done) - len(token_ids)]
            return ChatLogprobs(content=await _logprobs_off_loop(chat_logprobs, llm.info.tokenizer, history,
                                                                 token_ids, entries, body.top_logprobs or 0))

        if not body.stream:
            await job.run()
            log_done(request, job)
            choices = [ChatChoice(index=i, message=AssistantMessage(content="".join(c.text)),
                                  finish_reason=c.finish_reason, logprobs=await logprobs_of(i, c.token_ids, c.logprobs))
                       for i, c in enumerate(job.choices)]
            return ChatCompletion(id=rid, created=created, model=llm.info.name, usage=usage_of(job), choices=choices)
        events = await primed(job.events())

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return ChatCompletionChunk(id=rid, created=created, model=llm.info.name, choices=choices,
                                       usage=usage).model_dump_json()

        async def delta(ev: Event) -> list[ChatChunkChoice]:
            out = []
            if ev.text or ev.token_ids:
                out.append(ChatChunkChoice(index=ev.index, delta=ChatDelta(content=ev.text),
                                           logprobs=await logprobs_of(ev.index, ev.token_ids, ev.logprobs)))
            if ev.finish_reason:
                out.append(ChatChunkChoice(index=ev.index, delta=ChatDelta(), finish_reason=ev.finish_reason))
            return out

        async def payloads() -> AsyncIterator[str]:
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                         for i in range(len(job.choices))])
            async for ev in events:
                for choice in await delta(ev):
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
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        llm = ctx.llm_for(body.model)
        # Tokenizing is work too: it costs the key a request (its tokens are not generated, so not charged).
        await ctx.limiter.reserve(request.state.key, 0)
        if body.prompt is not None:
            [ids] = await encode_texts(llm.info.tokenizer, [body.prompt])
        else:
            ids = await encode_chat(llm.info.tokenizer, body.messages, body.add_generation_prompt)
        return TokenizeResponse(count=len(ids), max_model_len=llm.info.max_model_len, tokens=ids)

    return router


def check_supported(body: CompletionRequest | ChatCompletionRequest) -> None:
    found = body.unsupported_field()
    if found is not None:
        field, why = found
        raise bad_request(f"unsupported field {field}: {why}", "unsupported_field")


def _prompt_texts(body: CompletionRequest, prompts: list[list[int]], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """What echo returns for each prompt: the text as sent, or the decoded token ids."""
    if isinstance(body.prompt, str):
        return [body.prompt]
    if isinstance(body.prompt[0], str):
        return list(body.prompt)
    return tokenizer.batch_decode(prompts, skip_special_tokens=True)


async def _logprobs_off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` inline when its token lists are short, else on the ingress's pool (request-sized work)."""
    return await off_loop(sum(len(a) for a in args if isinstance(a, list)) <= _INLINE_LOGPROB_TOKENS, fn, *args)
