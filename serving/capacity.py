"""Capacity planning for a Llama checkpoint on GPUs: pure formulas over the model's `config.json`.

Every number is per tensor-parallel rank (one GPU) unless it says otherwise, and follows what the engine
does: column/row-parallel linears and the vocabulary-parallel embedding and LM head split by the TP size,
KV heads split too (replicated when there are fewer KV heads than ranks), norms replicated on each rank;
the KV pool is `kv_cache_memory_fraction` of the memory left after the weights, in whole blocks, capped at
what `max_num_seqs` full-length sequences could use (default_kv_pool, which the engine calls).

Speed bounds are rooflines, upper bounds that ignore communication and kernel efficiency:
- batch-1 decode is bandwidth bound: each token reads every weight and the sequence's cached keys and
  values once, so tokens/s <= aggregate HBM bandwidth / bytes read per token;
- a large batch is compute bound: tokens/s <= aggregate FLOP/s / FLOPs per token (2 per weight of the
  matmuls, plus attention's 4 x layers x heads x head_dim per token of context).
Replicas for a target load apply `utilization` (the share of the roofline the plan counts on) to the
decode rate at the batch the KV pool holds, plus prefill at the compute bound.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.config import EngineConfig

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
KV_CACHE_DTYPES = ("auto", "int8")
QUANTIZATIONS = (None, "int8")
# int8 KV entries carry a float16 scale and zero per token and KV head (serving/layers/kv_quant.py).
INT8_KV_PARAM_BYTES = 4
# Weight-only int8 keeps one float32 scale per output channel (serving/layers/int8_weights.py); embeddings,
# LM head and norms stay in the model dtype.
INT8_WEIGHT_SCALE_BYTES = 4


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from a Hugging Face Llama `config.json`."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"], num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads, vocab_size=config["vocab_size"],
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @classmethod
    def load(cls, model: str | Path) -> ModelShape:
        """From a checkpoint folder, a `config.json` path, or the embedded default model's name."""
        path = Path(model).expanduser()
        if not path.exists():
            from serving.models.tiny import resolve_model

            path = resolve_model(str(model))
        if path.is_dir():
            path = path / "config.json"
        return cls.from_config(json.loads(path.read_text()))


@dataclass(frozen=True)
class Hardware:
    gpus: int = 8
    gpu_memory_gb: float = 80.0                  # GB = 1e9 bytes, as GPU memory is sold
    hbm_bandwidth_gbs: float = 2039.0            # A100 80GB SXM
    tflops: float = 312.0                        # A100 dense bf16/fp16 tensor cores

    def __post_init__(self) -> None:
        for name in ("gpus", "gpu_memory_gb", "hbm_bandwidth_gbs", "tflops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: expected a number > 0")


def gpu_block_size(dtype: str, kv_cache_dtype: str) -> int:
    """The block size the engine's auto picks on CUDA GPUs with flash-attn installed: the plan assumes them."""
    import torch

    from serving.layers.attention import auto_block_size

    return auto_block_size("auto", torch.device("cuda"), getattr(torch, dtype), kv_cache_dtype,
                           check_import=False)[0]


@dataclass(frozen=True)
class Deployment:
    # The engine's defaults (EngineConfig), but the dtype: the plan is for GPUs, where auto is bfloat16; and
    # block_size None is what auto picks there with flash-attn (gpu_block_size).
    tensor_parallel_size: int = EngineConfig.tensor_parallel_size
    dtype: str = "bfloat16"
    kv_cache_dtype: str = EngineConfig.kv_cache_dtype
    quantization: str | None = EngineConfig.quantization
    block_size: int | None = EngineConfig.block_size
    kv_cache_memory_fraction: float = EngineConfig.kv_cache_memory_fraction
    max_num_seqs: int = EngineConfig.max_num_seqs
    max_model_len: int | None = EngineConfig.max_model_len

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: expected {expected}")

        need(self.tensor_parallel_size >= 1, "tensor_parallel_size", "an integer >= 1")
        need(self.dtype in DTYPE_BYTES, "dtype", ", ".join(DTYPE_BYTES))
        need(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", "auto or int8")
        need(self.quantization in QUANTIZATIONS, "quantization", "None or int8")
        need(0 < self.kv_cache_memory_fraction < 1, "kv_cache_memory_fraction", "a fraction in (0, 1)")
        need(self.max_num_seqs >= 1, "max_num_seqs", "an integer >= 1")
        if self.block_size is None:
            object.__setattr__(self, "block_size", gpu_block_size(self.dtype, self.kv_cache_dtype))


@dataclass(frozen=True)
class Load:
    requests_per_s: float = 1.0
    prompt_tokens: int = 512
    output_tokens: int = 256
    utilization: float = 0.5                     # share of the roofline the plan counts on


def kv_heads_per_rank(shape: ModelShape, tp: int) -> int:
    return max(1, shape.num_kv_heads // tp)


def kv_bytes_per_head_token(head_dim: int, kv_cache_dtype: str, dtype_bytes: int) -> int:
    """One token's key (or value) of one KV head; the engine sizes its pool with this too."""
    return head_dim + INT8_KV_PARAM_BYTES if kv_cache_dtype == "int8" else head_dim * dtype_bytes


def kv_bytes_per_token(shape: ModelShape, d: Deployment) -> int:
    """Bytes one cached token takes on one rank: keys and values of every layer for its KV heads."""
    per_head = kv_bytes_per_head_token(shape.head_dim, d.kv_cache_dtype, DTYPE_BYTES[d.dtype])
    return 2 * shape.num_layers * kv_heads_per_rank(shape, d.tensor_parallel_size) * per_head


def linear_shapes_per_rank(shape: ModelShape, tp: int) -> list[tuple[int, int]]:
    """(out_features, in_features) of one layer's matmul weights on one rank."""
    h, q = shape.hidden_size, shape.num_heads * shape.head_dim // tp
    kv = kv_heads_per_rank(shape, tp) * shape.head_dim
    inter = shape.intermediate_size // tp
    return [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter)]


def weight_bytes_per_gpu(shape: ModelShape, d: Deployment) -> int:
    tp, dtype_bytes = d.tensor_parallel_size, DTYPE_BYTES[d.dtype]
    linears = linear_shapes_per_rank(shape, tp)
    linear_params = shape.num_layers * sum(o * i for o, i in linears)
    if d.quantization == "int8":
        channels = shape.num_layers * sum(o for o, _ in linears)
        linear_bytes = linear_params + channels * INT8_WEIGHT_SCALE_BYTES
    else:
        linear_bytes = linear_params * dtype_bytes
    vocab_rows = math.ceil(shape.vocab_size / tp)
    tables = vocab_rows * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    norms = (2 * shape.num_layers + 1) * shape.hidden_size
    return linear_bytes + (tables + norms) * dtype_bytes


@dataclass(frozen=True)
class KVPoolSize:
    blocks: int
    reason: str                                  # why this many, for the engine's start-up log line


def default_kv_pool(free_bytes: float, bytes_per_block: int, memory_fraction: float, max_num_seqs: int,
                    max_model_len: int, block_size: int, workspace_bytes: int = 0) -> KVPoolSize:
    """The engine's default KV pool: what `max_num_seqs` full-length sequences can use, capped at
    `memory_fraction` of `free_bytes` (the memory left after the weights) less the attention backend's
    `workspace_bytes` (0 for flash-attn; see AttentionBackend.workspace_bytes)."""
    budget = (int(free_bytes * memory_fraction) - workspace_bytes) // bytes_per_block
    useful = max_num_seqs * -(-max_model_len // block_size)
    need = f"max_num_seqs={max_num_seqs} sequences of max_model_len={max_model_len} tokens"
    share = f"{memory_fraction:.0%} of {free_bytes / 2**30:.1f} GiB free (kv_cache_memory_fraction)"
    if useful <= budget:
        return KVPoolSize(max(1, useful), f"what {need} use, under {share}; num_kv_blocks, or a lower "
                          "max_num_seqs or max_model_len, makes it smaller")
    return KVPoolSize(max(1, budget), f"{share}; {need} would use {useful * bytes_per_block / 2**30:.1f} GiB")


def kv_pool_blocks(free_bytes: float, shape: ModelShape, d: Deployment, max_model_len: int,
                   workspace_bytes: int = 0) -> int:
    """KV blocks the engine allocates from `free_bytes` left after the weights (as ModelRunner does)."""
    return default_kv_pool(free_bytes, d.block_size * kv_bytes_per_token(shape, d), d.kv_cache_memory_fraction,
                           d.max_num_seqs, max_model_len, d.block_size, workspace_bytes).blocks


def layer_matmul_weights(shape: ModelShape) -> int:
    """Matmul weights of all decoder layers, all ranks together (the LM head not included)."""
    return shape.num_layers * sum(o * i for o, i in linear_shapes_per_rank(shape, 1))


def attention_flops(shape: ModelShape, context: float) -> float:
    """One query token's attention over `context` keys in every layer: QK^T and PV, 2 FLOPs per multiply-add."""
    return 4 * shape.num_layers * shape.num_heads * shape.head_dim * context


def flops_per_token(shape: ModelShape, context: int) -> float:
    """Forward FLOPs of one token, all ranks together: 2 per matmul weight, plus attention over `context`."""
    matmul = layer_matmul_weights(shape) + shape.vocab_size * shape.hidden_size  # LM head
    return 2 * matmul + attention_flops(shape, context)


@dataclass(frozen=True)
class Plan:
    weight_bytes_per_gpu: int
    kv_bytes_per_token: int                      # per GPU (each rank holds its KV heads)
    free_bytes_per_gpu: float
    kv_blocks: int
    kv_tokens: int                               # per replica (every rank holds the same tokens)
    max_model_len: int
    seqs_at_full_context: int
    decode_tok_s_batch1: float                   # bandwidth bound, one replica
    decode_tok_s_compute_bound: float            # compute bound, one replica
    batch: int                                   # sequences of the target load the KV pool holds at once
    replica_tok_s: float                         # roofline decode at that batch
    replica_requests_per_s: float                # planned (with utilization), prefill included
    replicas_available: int
    replicas_needed: int
    fits: bool                                   # weights fit and at least one full-length sequence does

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def plan(shape: ModelShape, hw: Hardware, d: Deployment, load: Load) -> Plan:
    tp = d.tensor_parallel_size
    if shape.num_heads % tp or shape.intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide the {shape.num_heads} attention heads "
                         f"and the intermediate size {shape.intermediate_size}")
    if tp > hw.gpus:
        raise ValueError(f"tensor_parallel_size={tp} needs more GPUs than the {hw.gpus} given")
    max_model_len = d.max_model_len or shape.max_position_embeddings
    weights = weight_bytes_per_gpu(shape, d)
    kv_token = kv_bytes_per_token(shape, d)
    free = hw.gpu_memory_gb * 1e9 - weights
    blocks = kv_pool_blocks(free, shape, d, max_model_len) if free > 0 else 0
    kv_tokens = blocks * d.block_size
    full_context_blocks = -(-max_model_len // d.block_size)
    bandwidth, flops = tp * hw.hbm_bandwidth_gbs * 1e9, tp * hw.tflops * 1e12

    context = load.prompt_tokens + load.output_tokens // 2   # a sequence's mean context while decoding
    seq_blocks = -(-(load.prompt_tokens + load.output_tokens) // d.block_size)
    batch = max(1, min(d.max_num_seqs, blocks // seq_blocks)) if blocks else 1
    # One decode step reads every weight once and each sequence's cached tokens.
    step_bytes = tp * (weights + batch * context * kv_token)
    step_s = max(step_bytes / bandwidth, batch * flops_per_token(shape, context) / flops)
    replica_tok_s = batch / step_s
    prefill_s = load.prompt_tokens * flops_per_token(shape, load.prompt_tokens // 2) / flops
    # Replica time per request: its prefill holds the whole replica, its decode a 1/batch share of each step.
    request_s = prefill_s + load.output_tokens / replica_tok_s
    replica_rps = load.utilization / request_s
    return Plan(
        weight_bytes_per_gpu=weights, kv_bytes_per_token=kv_token, free_bytes_per_gpu=free, kv_blocks=blocks,
        kv_tokens=kv_tokens, max_model_len=max_model_len, seqs_at_full_context=blocks // full_context_blocks,
        decode_tok_s_batch1=bandwidth / (tp * (weights + context * kv_token)),
        decode_tok_s_compute_bound=flops / flops_per_token(shape, context),
        batch=batch, replica_tok_s=replica_tok_s, replica_requests_per_s=replica_rps,
        replicas_available=hw.gpus // tp, replicas_needed=max(1, math.ceil(load.requests_per_s / replica_rps)),
        fits=free > 0 and blocks >= full_context_blocks,
    )
