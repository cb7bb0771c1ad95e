"""Self-hosted Llama 2 chat serving engine.

`from serving import LLM, SamplingParams, RequestOutput` (contract). LLM pulls in torch and transformers,
so it is imported on first use: `import serving` alone stays light.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from serving.outputs import RequestOutput
from serving.sampling_params import SamplingParams

if TYPE_CHECKING:
    from serving.llm import LLM

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> object:
    if name == "LLM":
        from serving.llm import LLM
        return LLM
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
