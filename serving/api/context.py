"""Everything a request handler needs, built once per ingress replica."""
from __future__ import annotations

from dataclasses import dataclass

from serving.api.auth import KeyStore
from serving.api.backends import EmbeddingBackend, LLMBackend
from serving.api.errors import APIError
from serving.api.metrics import Metrics
from serving.api.ratelimit import RateLimiter
from serving.config import ApiSettings


@dataclass
class ApiContext:
    settings: ApiSettings
    keys: KeyStore | None
    limiter: RateLimiter
    metrics: Metrics
    llm: LLMBackend | None
    embedder: EmbeddingBackend | None
    # Shutdown: set by Ingress.drain; new requests are then answered 503 while accepted ones finish.
    draining: bool = False
    in_flight: int = 0                         # requests (streams until their last byte) being answered
    max_in_flight: int | None = None           # beyond it 503 (serving without Ray's proxy and its queue)

    @classmethod
    def create(cls, settings: ApiSettings, llm: LLMBackend | None, embedder: EmbeddingBackend | None,
               replica: str = "local") -> ApiContext:
        keys = KeyStore(settings.api_keys_file, settings.key_reload_interval_s) if settings.api_keys_file else None
        return cls(settings, keys, RateLimiter(settings.rate_limit_storage), Metrics(replica), llm, embedder)

    def llm_for(self, model: str) -> LLMBackend:
        if self.llm is not None and model == self.llm.info.name:
            return self.llm
        raise self._unknown(model, ["text generation"])

    def embedder_for(self, model: str) -> EmbeddingBackend:
        if self.embedder is not None and model == self.embedder.info.name:
            return self.embedder
        raise self._unknown(model, ["embeddings"])

    def backend_for(self, model: str) -> LLMBackend | EmbeddingBackend:
        """The text or the embedding model named `model` (the predict endpoint serves both)."""
        for backend in (self.llm, self.embedder):
            if backend is not None and model == backend.info.name:
                return backend
        raise self._unknown(model, ["text generation", "embeddings"])

    def _unknown(self, model: str, tasks: list[str]) -> APIError:
        """404 listing the models served for the asked tasks only, each under its task."""
        served = {"text generation": ("text generation models", self.llm),
                  "embeddings": ("embedding models", self.embedder)}
        listed = "; ".join(f"{label}: {backend.info.name if backend else 'none'}"
                           for label, backend in (served[task] for task in tasks))
        # The name is the caller's own input: quote a bounded prefix of it.
        return APIError(404, f"model {model[:100]!r} is not served for {' or '.join(tasks)} here ({listed})",
                        "model_not_found")
