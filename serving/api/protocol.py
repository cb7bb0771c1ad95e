"""Request and response schemas of the HTTP API (pydantic v2).

Requests validate strictly: a string where a number belongs, a NaN, a negative count or a missing field is
a 422 naming the field, before anything is tokenized. OpenAI fields we do not implement (tools, functions,
suffix, best_of > n, audio output, non-text content parts) are accepted only at the value that means "off"
(clients such as the openai library and MLflow's providers send those defaults); any other value is a 400
naming the field (`unsupported_field()`), never silently ignored. Fields OpenAI does not define are ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from serving.api.errors import bad_request
from serving.engine.prompts import ChatRole
from serving.limits import LIMITS


def _valid_unicode(text: str) -> str:
    # JSON can carry a lone surrogate ("\ud800"); the tokenizer (and the JSON encoder of any reply that
    # quotes it) cannot take one.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {exc.start}") from None
    return text


def _check_chars(texts: list[str], field: str) -> None:
    """All of a request's text, bounded before any of it is tokenized or rendered."""
    total = sum(map(len, texts))
    if total > LIMITS.text_chars:
        raise ValueError(f"{field}: {total} characters in one request; at most {LIMITS.text_chars}")


# Bounds from the one table (serving/limits.py), so a bad value is a 422 at the door, not work.
Text = Annotated[str, AfterValidator(_valid_unicode)]
Temperature = Annotated[float, Field(ge=0.0, le=LIMITS.temperature, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=-1, le=LIMITS.top_k, description="-1 or 0 disables top-k")]
Seed = Annotated[int, Field(ge=0, le=LIMITS.seed)]
# No upper bound here: any value over the context window is a 400 naming both counts (GenerationJob), before
# any work; the engine's own bound (LIMITS.max_tokens) is far above every window.
MaxTokens = Annotated[int, Field(ge=1)]
StopString = Annotated[Text, Field(min_length=1, max_length=LIMITS.stop_chars)]
Stop = StopString | Annotated[list[StopString], Field(max_length=LIMITS.stop_strings)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
NumLogprobs = Annotated[int, Field(ge=0, le=LIMITS.logprobs)]
# OpenAI's shape: token ids as JSON object keys (strings).
LogitBias = Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                           Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]],
                      Field(max_length=LIMITS.logit_bias_tokens)]


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
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    # vLLM's and transformers' (MosaicML's `parameters` too): > 1 discourages any token seen before.
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] = 1.0
    logit_bias: LogitBias | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0

    def sampling_kwargs(self) -> dict[str, Any]:
        """SamplingParams keyword arguments (n and max_tokens are set per job)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": -1 if self.top_k == 0 else self.top_k,
                "stop": self.stop, "seed": self.seed, "ignore_eos": self.ignore_eos,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "repetition_penalty": self.repetition_penalty, "min_tokens": self.min_tokens,
                "logit_bias": {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None}


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(SamplingKnobs):
    """What completions and chat share on top of the knobs."""

    n: Annotated[int, Field(ge=1, le=LIMITS.n)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's structured-output extension (at most one of them).
    guided_json: dict[str, Any] | str | None = None
    guided_regex: Annotated[Text, Field(min_length=1, max_length=LIMITS.grammar_chars)] | None = None
    guided_choice: Annotated[list[Annotated[Text, Field(min_length=1, max_length=LIMITS.grammar_chars)]],
                             Field(min_length=1, max_length=LIMITS.guided_choices)] | None = None

    # OpenAI's structured output (vLLM takes it on completions too).
    response_format: ResponseFormat | None = None

    def guided_decoding(self) -> dict[str, Any] | None:
        """GuidedDecodingParams keyword arguments, or None; APIError 400 when several are given."""
        given = {f"guided_{name}": {name: value} for name, value in
                 (("json", self.guided_json), ("regex", self.guided_regex), ("choice", self.guided_choice))
                 if value is not None}
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            given["response_format"] = {"json_object": True}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise bad_request("response_format.json_schema is required for type json_schema", "invalid_field")
            given["response_format"] = {"json": fmt.json_schema.json_schema}
        if len(given) > 1:
            raise bad_request(f"give at most one of {', '.join(given)}", "invalid_field")
        return next(iter(given.values()), None)

    def unsupported_field(self) -> tuple[str, str] | None:
        """(field, why) for the first field set to something this server does not do, else None."""
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(SamplingFields):
    model: Text
    # A string, a batch of strings, one tokenized prompt or a batch of tokenized prompts (as OpenAI).
    prompt: (Text | Annotated[list[Text], Field(min_length=1)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1)])
    # 0 only with echo: score the prompt, generate nothing.
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    logprobs: NumLogprobs | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1, le=LIMITS.n)] | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _bounded(self) -> CompletionRequest:
        prompt = self.prompt
        _check_chars([prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)], "prompt")
        return self

    def unsupported_field(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "insertion (suffix) is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of must equal n (server-side best-of selection is not supported)"
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens=0 only makes sense with echo=true (scoring the prompt)"
        return None


class ContentPart(_Strict):
    # Any type parses, so that a non-text part is a 400 naming it rather than a union error.
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: Text | None = None


class ChatMessage(_Strict):
    role: ChatRole
    content: Text | list[ContentPart]
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)

    def unsupported_part(self) -> str | None:
        """The path of the first content part that is not text (e.g. `content[1].type='image_url'`)."""
        if isinstance(self.content, list):
            for j, part in enumerate(self.content):
                if part.type != "text" or part.text is None:
                    return f"content[{j}].type={part.type!r}"
        return None


Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=LIMITS.messages)]


class ChatCompletionRequest(SamplingFields):
    model: Text
    messages: Messages
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = None
    # Accepted at their "off" values only (see the module doc).
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None

    @model_validator(mode="after")
    def _bounded(self) -> ChatCompletionRequest:
        _check_chars([m.text() for m in self.messages], "messages")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported_field(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tool calling is not supported"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice", "tool calling is not supported"
        if self.functions:
            return "functions", "function calling is not supported"
        if self.function_call not in (None, "none", "auto"):
            return "function_call", "function calling is not supported"
        if self.audio is not None or (self.modalities is not None and self.modalities != ["text"]):
            return "audio" if self.audio is not None else "modalities", "only text output is supported"
        for i, message in enumerate(self.messages):
            part = message.unsupported_part()
            if part is not None:
                return f"messages[{i}].{part}", "only text content parts are supported"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs=true"
        return None



EmbeddingInputs = Annotated[list[Text], Field(min_length=1, max_length=LIMITS.embedding_inputs)]


class EmbeddingRequest(_Strict):
    model: Text
    input: Text | EmbeddingInputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _bounded(self) -> EmbeddingRequest:
        _check_chars([self.input] if isinstance(self.input, str) else self.input, "input")
        return self


class PredictParameters(SamplingKnobs):
    max_new_tokens: MaxTokens | None = None
    # MLflow's built-in mosaicml provider sends the gateway's `n`; one output per input is all this shape holds.
    n: Annotated[int, Field(ge=1, le=1)] = 1


class PredictRequest(_Strict):
    """MosaicML style: text inputs for a chat/text model (with `parameters`), or texts to embed."""

    inputs: EmbeddingInputs    # a text model takes at most max_prompts_per_request of them
    parameters: PredictParameters = Field(default_factory=PredictParameters)
    stream: bool = False

    @model_validator(mode="after")
    def _bounded(self) -> PredictRequest:
        _check_chars(self.inputs, "inputs")
        return self


class TokenizeRequest(_Strict):
    model: Text
    prompt: Text | None = None
    messages: Messages | None = None
    # Chat only: append the assistant prefix the model generates after (what /v1/chat/completions does).
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_of(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if self.prompt is not None:
            _check_chars([self.prompt], "prompt")
        else:
            _check_chars([m.text() for m in self.messages], "messages")
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


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape: per token its text, log-probability, top alternatives (the token
    itself included) and character offset in the choice's text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


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
    logprobs: ChatLogprobs | None = None


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
