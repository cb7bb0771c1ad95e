"""Engine and API settings: dataclasses validated at construction, the one source of each setting.

Every field carries its help text (and, for a fixed set of values, its choices) in its metadata. The offline
API (`LLM`) takes its defaults from `EngineConfig`; the application's schema (serving/app_config.py) and the
`mosaic-serve` flags are generated from these fields, so a default, a check or a help text lives only here.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from serving.limits import LIMITS

DEFAULT_MODEL = "tiny-llama-2-chat"


def setting(default: Any = MISSING, help: str = "", *, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with its help text (and allowed values) in its metadata."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


def _check_choices(config: Any) -> None:
    for f in fields(config):
        choices = f.metadata.get("choices")
        if choices is not None and getattr(config, f.name) not in choices:
            allowed = ", ".join(str(c) for c in choices)
            raise ValueError(f"invalid {f.name}={getattr(config, f.name)!r}: expected one of {allowed}")


def _need(config: Any, ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={getattr(config, name)!r}: expected {expected}")


@dataclass
class EngineConfig:
    model: str = setting(DEFAULT_MODEL, f"{DEFAULT_MODEL} (the embedded default) or a Hugging Face checkpoint "
                         "folder")
    tokenizer: str | None = setting(None, "tokenizer folder (default: the model folder)")
    tensor_parallel_size: int = setting(1, "ranks one replica shards the model over (one GPU each on GPUs)")
    dtype: str = setting("auto", "auto: bfloat16 on CUDA, float32 on CPU",
                         choices=("auto", "float32", "float16", "bfloat16"))
    device: str = setting("auto", "auto: cuda when available, else cpu; or a torch device such as cuda:1")
    max_model_len: int | None = setting(None, "context window in tokens (default: the model's "
                                        "max_position_embeddings)")
    max_num_seqs: int = setting(256, "sequences one replica runs at once (the batch)")
    max_num_batched_tokens: int | None = setting(None, "tokens per engine step (default: max(2048, "
                                                 "max_num_seqs))")
    # None is resolved once where the device is known (serving/engine/block_size.py), before blocks are sized.
    block_size: int | None = setting(None, "tokens per KV-cache block (default: none, auto: 256 where the "
                                     "attention backend resolves to flash_attn (CUDA, float16/bfloat16, flash-attn "
                                     "installed, kv_cache_dtype auto), else 16)",
                                     choices=(None, 8, 16, 32, 64, 128, 256))
    num_kv_blocks: int | None = setting(None, "KV-cache blocks per replica (default: kv_cache_memory_fraction of "
                                        "free memory, at most what max_num_seqs full-length sequences use)")
    kv_cache_memory_fraction: float = setting(0.3, "share of free memory the default KV pool may take (on "
                                              "CUDA: of what a profiled worst-case step leaves)")
    enable_prefix_caching: bool = setting(True, "reuse the KV blocks of a shared prompt prefix")
    seed: int = setting(0, "random seed of sampling without a per-request seed")
    attention_backend: str = setting("auto", "auto picks flash_attn on CUDA when installed, cpu_kernel on a "
                                     "float32 CPU model, else sdpa; cpu_kernel is the native CPU kernel "
                                     "(decodes, and prefills over short contexts)",
                                     choices=("auto", "sdpa", "flash_attn", "cpu_kernel"))
    kv_cache_dtype: str = setting("auto", "auto: the model dtype; int8: quantized per token and KV head "
                                  "(head_dim + 4 bytes each)", choices=("auto", "int8"))
    quantization: str | None = setting(None, "int8: weight-only, per output channel, quantized at load time",
                                       choices=(None, "int8"))
    packed_weights: bool = setting(True, "CPU float32: also hold the matmul weights packed for oneDNN, used by "
                                   "steps of 9 rows or more (1.2-1.7x faster matmuls; the weights' size once "
                                   "more in memory); not with compile, whose graph reads the plain weights")
    compile: bool = setting(False, "pure decode steps through torch.compile at batch sizes bucketed to powers of "
                            "two, each compiled at start (off by default: on CPU it did not clearly win)")
    cuda_graphs: bool = setting(True, "on CUDA with a graph-safe attention backend (flash_attn), pure decode steps "
                                "replay CUDA graphs captured at start for the compile option's batch buckets; "
                                "False: decode runs eagerly (elsewhere it always does)")
    served_model_name: str | None = setting(None, "the name clients use (default: the model name, or a "
                                            "checkpoint's folder name)")
    stall_timeout_s: float = setting(30.0, "seconds with work but no engine step before the engine reports "
                                     "unhealthy")
    # An idle group stays alive with a keepalive message well inside it.
    tp_timeout_s: float = setting(600.0, "tensor parallelism: seconds a collective (and the ranks' rendezvous) "
                                  "may wait before it fails")

    def __post_init__(self) -> None:
        need = lambda ok, name, expected: _need(self, ok, name, expected)
        _check_choices(self)
        need(isinstance(self.model, str) and bool(self.model), "model", "a model name or checkpoint folder")
        need(self.tensor_parallel_size >= 1, "tensor_parallel_size", "an integer >= 1")
        need(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", "None or >= 1")
        need(self.max_num_seqs >= 1, "max_num_seqs", "an integer >= 1")
        need(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= (self.block_size or 1),
             "max_num_batched_tokens", "None or at least block_size")
        need(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks", "None or >= 1")
        need(0.0 < self.kv_cache_memory_fraction < 1.0, "kv_cache_memory_fraction", "a fraction in (0, 1)")
        need(self.stall_timeout_s > 0, "stall_timeout_s", "a number of seconds > 0")
        need(self.tp_timeout_s > 0, "tp_timeout_s", "a number of seconds > 0")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = max(2048, self.max_num_seqs)


@dataclass(frozen=True)
class ApiSettings:
    """What the HTTP layer (serving/api/) needs, per ingress replica."""

    api_keys_file: str | None = setting(None, "API key file (`mosaic-serve keys add NAME --api-keys-file F`); "
                                        "none: no authentication")
    key_reload_interval_s: float = setting(1.0, "seconds between checks of the key file for changes")
    rate_limit_storage: str = setting("memory://", "per-key limits: memory:// (per ingress replica) or a shared "
                                      "store such as redis://host:6379")
    max_request_bytes: int = setting(2 * 1024 * 1024, "largest request body accepted (413 beyond)")
    request_read_timeout_s: float = setting(30.0, "seconds a client has to send a request's line and "
                                            "headers (from connecting, or from the request's first byte), "
                                            "and then its body (408 beyond): a silent or trickling client "
                                            "is cut off, not waited for")
    default_max_tokens: int = setting(256, "max_tokens of chat and predict requests without one (completions "
                                      "default to 16)")
    max_prompts_per_request: int = setting(LIMITS.prompts, f"prompts per request (at most {LIMITS.prompts})")
    retry_after_s: int = setting(1, "Retry-After seconds of 503 and 429 answers")

    def __post_init__(self) -> None:
        need = lambda ok, name, expected: _need(self, ok, name, expected)
        need(self.key_reload_interval_s > 0, "key_reload_interval_s", "a number of seconds > 0")
        need(self.max_request_bytes >= 1024, "max_request_bytes", "at least 1024")
        need(self.request_read_timeout_s > 0, "request_read_timeout_s", "a number of seconds > 0")
        need(self.default_max_tokens >= 1, "default_max_tokens", "an integer >= 1")
        need(1 <= self.max_prompts_per_request <= LIMITS.prompts, "max_prompts_per_request",
             f"an integer in [1, {LIMITS.prompts}]")
        need(self.retry_after_s >= 1, "retry_after_s", "an integer >= 1")
