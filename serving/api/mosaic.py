"""MosaicML-style `POST /{model}/v1/predict`, for the chat model and the embedding model.

Text model: `{"inputs": [str], "parameters": {"max_new_tokens", "temperature", "top_p", "top_k", "stop",
"seed", "repetition_penalty"}}` (and the other sampling fields of the OpenAI endpoints) -> `{"outputs": [str], "finish_reasons": [...], "usage": {...}}`; inputs are raw prompts (no chat
template). With `"stream": true` the answer is server-sent events `{"index", "outputs": [new text],
"finish_reason"}` ending in `[DONE]`. Embedding model: `{"inputs": [str]}` -> `{"outputs": [[float]]}`.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from serving.api.backends import EmbeddingBackend
from serving.api.context import ApiContext
from serving.api.embedding import embed
from serving.api.errors import bad_request
from serving.api.generation import GenerationJob, encode_texts, primed
from serving.api.protocol import PredictChunk, PredictRequest, PredictResponse, Usage
from serving.api.responses import log_done, sse_response, usage_of


def build_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()

    @router.post("/{model}/v1/predict", response_model=None)
    async def predict(model: str, body: PredictRequest, request: Request) -> PredictResponse | StreamingResponse:
        llm = ctx.backend_for(model)
        if isinstance(llm, EmbeddingBackend):
            if body.stream:
                raise bad_request("embeddings cannot be streamed")
            vectors, tokens = await embed(ctx, llm, request, body.inputs)
            return PredictResponse(outputs=vectors.tolist(), usage=Usage.of(tokens, 0))
        if len(body.inputs) > ctx.settings.max_prompts_per_request:
            raise bad_request(f"{len(body.inputs)} inputs in one request; at most "
                              f"{ctx.settings.max_prompts_per_request}")
        p = body.parameters
        prompts = await encode_texts(llm.info.tokenizer, body.inputs)
        job = GenerationJob(llm, ctx.metrics, request.state.key, prompts, p.max_new_tokens,
                            ctx.settings.default_max_tokens, p.sampling_kwargs(), n=1)
        await job.admit(ctx.limiter)
        if not body.stream:
            await job.run()
            log_done(request, job)
            return PredictResponse(outputs=["".join(c.text) for c in job.choices],
                                   finish_reasons=[c.finish_reason for c in job.choices], usage=usage_of(job))
        events = await primed(job.events())

        async def payloads() -> AsyncIterator[str]:
            async for ev in events:
                if ev.text or ev.finish_reason:
                    yield PredictChunk(index=ev.index, outputs=[ev.text],
                                       finish_reason=ev.finish_reason).model_dump_json()
            log_done(request, job)

        return sse_response(payloads())

    return router
