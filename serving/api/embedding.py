"""What the embedding endpoints (OpenAI's and predict) share: count, check, charge and embed."""
from __future__ import annotations

import logging

import numpy as np
from fastapi import Request

from serving.api.backends import EmbeddingBackend
from serving.api.context import ApiContext
from serving.api.errors import bad_request
from serving.api.generation import INLINE_TEXT_CHARS, off_loop
from serving.embeddings import check_inputs

logger = logging.getLogger(__name__)


async def embed(ctx: ApiContext, embedder: EmbeddingBackend, request: Request,
                texts: list[str]) -> tuple[np.ndarray, int]:
    """Count, check, charge and embed `texts` (for the embeddings and the predict endpoint)."""
    encoded = await off_loop(sum(map(len, texts)) + len(texts) <= INLINE_TEXT_CHARS, embedder.info.tokenizer, texts,
                             add_special_tokens=True)
    counts = [len(ids) for ids in encoded["input_ids"]]
    try:
        check_inputs(counts, embedder.info.max_input_tokens)
    except ValueError as exc:
        raise bad_request(str(exc), "invalid_input") from None
    reservation = await ctx.limiter.reserve(request.state.key, sum(counts))
    try:
        vectors, tokens = await embedder.embed(texts)
    except BaseException:
        await ctx.limiter.settle(reservation, 0)
        raise
    logger.info("embeddings key=%s inputs=%d tokens=%d", request.state.key.name, len(texts), tokens)
    return vectors, tokens
