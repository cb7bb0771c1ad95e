"""Request and response schemas of the HTTP API (pydantic v2).

Requests validate strictly: a string where a number belongs, a NaN, a negative count or a missing field is
a 422 naming the field, before anything is tokenized. Fields we do not implement are ignored (clients such
as the openai library and MLflow's providers send their defaults for them).
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Mirrors SamplingParams' own bounds so a bad value is a 422 at the door, not a 400 from the engine.
MAX_N = 16
MAX_STOP = 16
MAX_SEED = 2**63 - 1

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=-1, description="-1 or 0 disables top-k")]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
MaxTokens = Annotated[int, Field(ge=1)]
Stop = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False
    # vLLM's extension: every chunk carries the usage so far (clients can time each token exactly).
    continuous_usage_stats: bool = False


class SamplingKnobs(_Strict):
    """The sampling settings every text endpoint takes (OpenAI names, plus vLLM's top_k and ignore_eos)."""

    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1
    stop: Stop | None = None
    seed: Seed | None = None
    ignore_eos: bool = False

    def sampling_kwargs(self) -> dict[str, Any]:
        """SamplingParams keyword arguments (n and max_tokens are set per job)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": -1 if self.top_k == 0 else self.top_k,
                "stop": self.stop, "seed": self.seed, "ignore_eos": self.ignore_eos}


class SamplingFields(SamplingKnobs):
    """What completions and chat share on top of the knobs."""

    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(SamplingFields):
    model: str
    # A string, a batch of strings, one tokenized prompt or a batch of tokenized prompts (as OpenAI).
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
        | Annotated[list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]], Field(min_length=1)]
    )
    max_tokens: MaxTokens | None = 16


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class EmbeddingRequest(_Strict):
    model: str
    input: str | Annotated[list[str], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None


class PredictParameters(SamplingKnobs):
    max_new_tokens: MaxTokens | None = None
    # MLflow's built-in mosaicml provider sends the gateway's `n`; one output per input is all this shape holds.
    n: Annotated[int, Field(ge=1, le=1)] = 1


class PredictRequest(_Strict):
    """MosaicML style: text inputs for a chat/text model (with `parameters`), or texts to embed."""

    inputs: Annotated[list[str], Field(min_length=1)]
    parameters: PredictParameters = Field(default_factory=PredictParameters)
    stream: bool = False


class TokenizeRequest(_Strict):
    model: str
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    # Chat only: append the assistant prefix the model generates after (what /v1/chat/completions does).
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_of(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


# ---- responses -------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mosaic-serve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class PredictResponse(BaseModel):
    outputs: list[str] | list[list[float]]
    # Extensions over the MosaicML shape, for callers that track budgets (the gateway does).
    finish_reasons: list[FinishReason | None] | None = None
    usage: Usage | None = None


class PredictChunk(BaseModel):
    """One SSE event of a streamed predict: new text of input `index`."""

    index: int
    outputs: list[str]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
