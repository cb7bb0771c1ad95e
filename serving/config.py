"""Engine configuration: dataclasses validated at construction."""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MODEL = "tiny-llama-2-chat"


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL            # the embedded default's name, or a Hugging Face checkpoint folder
    tokenizer: str | None = None          # defaults to the model folder
    tensor_parallel_size: int = 1
    dtype: str = "auto"                   # auto: bf16 on CUDA, fp32 on CPU; or float32 / float16 / bfloat16
    device: str = "auto"                  # auto: cuda when available, else cpu
    max_model_len: int | None = None      # defaults to the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # tokens per step; defaults to max(2048, max_num_seqs)
    block_size: int = 16
    num_kv_blocks: int | None = None      # defaults to a budget from free memory (kv_cache_memory_fraction)
    kv_cache_memory_fraction: float = 0.3
    enable_prefix_caching: bool = True
    seed: int = 0
    attention_backend: str = "auto"       # auto | sdpa | flash_attn | cpu_kernel
    kv_cache_dtype: str = "auto"          # auto: the model dtype; int8: quantized per token and KV head
    quantization: str | None = None       # None, or int8: weight-only, per output channel
    served_model_name: str | None = None  # the name clients use; defaults to the model argument
    stall_timeout_s: float = 30.0         # health check fails when work waits this long without a step
    # Tensor parallelism: a collective (and the ranks' rendezvous) that waits this long fails; an idle group
    # stays alive with a keepalive message well inside it.
    tp_timeout_s: float = 600.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: expected {expected}")

        need(isinstance(self.model, str) and bool(self.model), "model", "a model name or checkpoint folder")
        need(self.tensor_parallel_size >= 1, "tensor_parallel_size", "an integer >= 1")
        need(self.dtype in ("auto", "float32", "float16", "bfloat16"), "dtype",
             "auto, float32, float16 or bfloat16")
        need(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", "None or >= 1")
        need(self.max_num_seqs >= 1, "max_num_seqs", "an integer >= 1")
        need(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= self.block_size,
             "max_num_batched_tokens", "None or at least block_size")
        need(self.block_size in (8, 16, 32, 64, 128, 256), "block_size", "a power of two in [8, 256]")
        need(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks", "None or >= 1")
        need(0.0 < self.kv_cache_memory_fraction < 1.0, "kv_cache_memory_fraction", "a fraction in (0, 1)")
        need(self.stall_timeout_s > 0, "stall_timeout_s", "a number of seconds > 0")
        need(self.tp_timeout_s > 0, "tp_timeout_s", "a number of seconds > 0")
        need(self.attention_backend in ("auto", "sdpa", "flash_attn", "cpu_kernel"), "attention_backend",
             "auto, sdpa, flash_attn or cpu_kernel")
        need(self.kv_cache_dtype in ("auto", "int8"), "kv_cache_dtype", "auto or int8")
        need(self.quantization in (None, "int8"), "quantization", "None or int8")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = max(2048, self.max_num_seqs)
