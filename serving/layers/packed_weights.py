"""float32 CPU weights held a second time in oneDNN's blocked layout, for matmuls of more than a few rows.

torch's default CPU GEMM repacks the weight on every call; with a decode batch or a prefill chunk the weight
is reused across calls, so packing it once pays. Measured on llama-prop's and the tiny model's shapes (2
threads, AVX2): 1.2-1.7x F.linear from 16 to 1000 rows, and a 2048-square product at ~210 GFLOP/s against
torch.mm's ~150-180. Below ~8 rows the native small-batch kernel (serving/kernels/small_linear.c) is faster
still, so the dense weight stays too: the copy costs the weights' size once more in memory.
"""
from __future__ import annotations

import torch

# Rows of x from which a packed weight is used (below, the small-batch kernel or F.linear).
PACKED_MIN_ROWS = 9


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and torch.backends.mkldnn.is_available())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The [N, K] weight as an opaque oneDNN tensor for `packed_linear` (a copy: `weight` is unchanged)."""
    if not can_pack(weight):
        raise ValueError(f"cannot pack a {weight.dtype} weight of shape {tuple(weight.shape)} on "
                         f"{weight.device} (oneDNN available: {torch.backends.mkldnn.is_available()})")
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K] float32 on the CPU, with `packed` = pack(weight)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
