"""One embedding replica: a sentence-embedding model, run off the event loop."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from serving.embeddings import EmbeddingModel, resolve_embedding_model
from serving.engine.errors import ErrorKind, ErrorResult
from serving.replicas.process import enter_replica

if TYPE_CHECKING:
    from serving.app_config import AppConfig


class EmbeddingServer:
    def __init__(self, config: AppConfig):
        self.replica = enter_replica(config.embedding_num_cpus)
        self.model = EmbeddingModel(resolve_embedding_model(config.embedding_model, config.embedding_served_name))

    def info(self) -> dict[str, Any]:
        return {"name": self.model.name, "dimensions": self.model.dimensions,
                "max_input_tokens": self.model.max_input_tokens, "tokenizer": self.model.tokenizer}

    async def embed(self, texts: list[str]) -> tuple[Any, int] | ErrorResult:
        """(vectors, tokens), or bad input as an ErrorResult (raised, Ray would log it at ERROR)."""
        try:
            # Off the event loop, so health checks and other calls are answered meanwhile.
            return await asyncio.to_thread(self.model.embed, texts)
        except ValueError as exc:
            return ErrorResult(ErrorKind.INVALID, str(exc))

    def health(self) -> dict[str, Any]:
        return {"replica": self.replica, "model": self.model.name, "healthy": True}
