"""Weight-only int8 for linear layers: per output channel, symmetric, quantized at load time.

A weight W [N, K] is stored as int8 codes C and one scale per output row s [N], W ≈ s[:, None] * C, with
s = max|W[n, :]| / 127. Activations stay in the model dtype. The matmul route depends on the batch and on
the kernels ATen runs on this CPU (benchmarks/quantization.py measures the routes):

- few rows (decode), and on AVX-512 every batch: torch's `_weight_int8pack_mm`, which reads the int8 codes
  directly. It is fast with bfloat16 activations and several times slower than a dense float32 matmul with
  float32 ones, so float32 activations are rounded to bfloat16 for it (and the result back): a relative
  error of ~2^-9 per element, below int8's own (~1/100 of a row's spread).
- many rows (prefill) with other kernels, and CUDA: the codes are dequantized into a scratch buffer shared
  by all layers and a dense matmul runs in the model dtype; the dequantization is amortized over the rows.

Where the rows cross over (PACKED_MAX_ROWS), measured on 768 x 2304 and 3072 x 768 weights, 2 threads:
with ATen's AVX-512 kernels (a 2-vCPU AMD EPYC with AVX-512) `_weight_int8pack_mm` took 1.4-1.6x a dense
matmul's time at 16-512 rows and dequantize-then-matmul 2.4-3.5x, so the packed route wins at every batch;
the first (AVX2) machine measured the crossover at 16 rows, which other kernels keep.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

_LEVELS = 127


def packed_max_rows(cpu_capability: str) -> float:
    """Rows up to which `_weight_int8pack_mm` beats dequantize-then-matmul with ATen's kernels for this CPU
    capability (torch.backends.cpu.get_cpu_capability()): measured, see the module doc."""
    return math.inf if cpu_capability.startswith("AVX512") else 16


PACKED_MAX_ROWS = packed_max_rows(torch.backends.cpu.get_cpu_capability())
_scratch = threading.local()


def quantize_per_channel(weight: torch.Tensor, absmax: torch.Tensor | None = None) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """weight [N, K] -> (int8 codes [N, K], float32 scales [N]). `absmax` [N] overrides the rows' own
    maxima (a row-parallel shard uses its whole row's, so every tensor-parallel size gets the same codes)."""
    if absmax is None:
        absmax = weight.abs().amax(dim=1).float()
    scale = (absmax / _LEVELS).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(weight.float() / scale[:, None]).clamp_(-_LEVELS, _LEVELS).to(torch.int8)
    return codes, scale


def _dequantize_into_scratch(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes * scale in `dtype`, in a per-thread buffer that every layer reuses (layers run one by one)."""
    key = (dtype, codes.device)
    buffer = _scratch.__dict__.get(key)
    if buffer is None or buffer.numel() < codes.numel():
        buffer = _scratch.__dict__[key] = torch.empty(codes.numel(), dtype=dtype, device=codes.device)
    out = buffer[:codes.numel()].view(codes.shape)
    return torch.mul(codes, scale[:, None], out=out)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (scale * codes).T (+ bias) -> [..., N] in x's dtype."""
    rows = x.numel() // x.shape[-1]
    if x.device.type == "cpu" and rows <= PACKED_MAX_ROWS:
        act = x if x.dtype in (torch.bfloat16, torch.float16) else x.to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(act.reshape(rows, x.shape[-1]), codes, scale.to(act.dtype))
        y = y.view(*x.shape[:-1], codes.shape[0]).to(x.dtype)
    else:
        y = F.linear(x, _dequantize_into_scratch(codes, scale, x.dtype))
    return y if bias is None else y + bias
