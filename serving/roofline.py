"""How far a run is from the machine's limits: useful FLOPs (for MFU) and bytes read per decoded token (for
MBU), pure formulas over a ModelShape built on serving/capacity.py's weight, KV and FLOP counts.

"Useful" counts the work a request needs, not what an implementation spends: every token fed to the model
(the prompt, then each output token but the last, which is never fed back) goes through the layers' matmuls
and attends causally over its context; only the tokens that are sampled go through the LM head. Padding,
recomputation after preemption and discarded logits are not useful work.
"""
from __future__ import annotations

from collections.abc import Iterable

from serving.capacity import (
    DTYPE_BYTES,
    Deployment,
    ModelShape,
    attention_flops,
    kv_bytes_per_token,
    layer_matmul_weights,
    weight_bytes_per_gpu,
)


def request_flops(shape: ModelShape, prompt_len: int, output_len: int) -> float:
    """Useful forward FLOPs of one request of `prompt_len` prompt and `output_len` generated tokens."""
    if prompt_len < 1 or output_len < 1:
        raise ValueError(f"a request needs prompt_len >= 1 and output_len >= 1, "
                         f"got {prompt_len} and {output_len}")
    fed = prompt_len + output_len - 1
    # The token at position p attends over p + 1 keys: sum over p < fed is fed * (fed + 1) / 2.
    keys = fed * (fed + 1) / 2
    return (2 * layer_matmul_weights(shape) * fed + 2 * shape.vocab_size * shape.hidden_size * output_len
            + attention_flops(shape, keys))


def workload_flops(shape: ModelShape, requests: Iterable[tuple[int, int]]) -> float:
    """Useful FLOPs of (prompt_len, output_len) requests."""
    return sum(request_flops(shape, p, n) for p, n in requests)


def decode_bytes_per_token(shape: ModelShape, context: float, dtype: str = "float32",
                           kv_cache_dtype: str = "auto") -> float:
    """Bytes a batch-1 decode step must read: every weight once (of an untied embedding table only the one
    row it looks up) and the sequence's cached keys and values over `context` tokens."""
    d = Deployment(dtype=dtype, kv_cache_dtype=kv_cache_dtype)
    weights = weight_bytes_per_gpu(shape, d)
    if not shape.tie_word_embeddings:
        weights -= (shape.vocab_size - 1) * shape.hidden_size * DTYPE_BYTES[dtype]
    return weights + context * kv_bytes_per_token(shape, d)


def utilization(achieved: float, peak: float) -> float:
    """Share of a measured peak (FLOP/s for MFU, bytes/s for MBU)."""
    if not peak > 0:
        raise ValueError(f"peak must be > 0, got {peak}")
    return achieved / peak
