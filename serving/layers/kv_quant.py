"""int8 KV cache entries: online, per token and per KV head, asymmetric.

Each cached key (or value) vector x of one token and one KV head is stored as int8 codes q with two float16
parameters beside it, a scale and a zero (the midpoint of the vector's range): x ≈ scale * q + zero, q in
[-127, 127]. No calibration: the parameters come from the vector itself when it is written.

Why asymmetric (lmdeploy's scheme): a vector whose values are not centred on 0 (keys after RoPE often are
not) would waste up to half the int8 range under a symmetric scale; the zero costs 2 bytes per head and token
and, in the decode kernel, one multiply-add per head (q·x = scale * q·codes + zero * sum(q)). Why float16
parameters: 4 bytes instead of 8 beside a 64-dim head (68 instead of 72 bytes per head and token, 3.76x fewer
than float32), and the parameters are rounded to float16 *before* the codes are computed, so dequantization
uses exactly the parameters the codes were made with; what float16 costs is only the rounding of the zero,
at most 2^-11 of its magnitude, on values at the very ends of the range.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.kernels.fused import store_int8_kv

PARAM_DTYPE = torch.float16   # 2 x 2 bytes beside each token's int8 vector of one KV head (capacity.py counts them)
_LEVELS = 127
# The smallest normal float16: a constant vector gets this scale, not 0 (which would divide by zero).
_MIN_SCALE = torch.finfo(PARAM_DTYPE).tiny


@dataclass(frozen=True)
class QuantizedKV:
    """One layer's cached keys (or values) in int8; views into the runner's one allocation."""

    codes: torch.Tensor     # [num_blocks, block_size, KVH, D] int8
    params: torch.Tensor    # [num_blocks, block_size, KVH, 2] float16: scale, zero
    dtype: torch.dtype      # the dtype attention computes in (what the entries dequantize to)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 codes [..., D], float16 params [..., 2])."""
    lo, hi = torch.aminmax(x.float(), dim=-1, keepdim=True)
    scale = ((hi - lo) / (2 * _LEVELS)).clamp_min_(_MIN_SCALE).to(PARAM_DTYPE)
    zero = ((hi + lo) / 2).to(PARAM_DTYPE)
    codes = ((x.float() - zero.float()) / scale.float()).round_().clamp_(-_LEVELS, _LEVELS).to(torch.int8)
    return codes, torch.cat((scale, zero), dim=-1)


def dequantize(codes: torch.Tensor, params: torch.Tensor, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """(codes [..., D], params [..., 2]) -> values [..., D] in `dtype` (written into `out` when given)."""
    params = params.float()
    values = torch.mul(codes, params[..., :1], out=out)
    values.add_(params[..., 1:])
    return values if values.dtype == dtype else values.to(dtype)


def write(cache: torch.Tensor | QuantizedKV, x: torch.Tensor, slots: torch.Tensor) -> None:
    """Store x [T, KVH, D] at the flat cache slots [T] (quantizing it for an int8 cache)."""
    if isinstance(cache, QuantizedKV):
        if store_int8_kv(cache.codes, cache.params, x, slots):    # float32 on CPU: one native pass
            return
        codes, params = quantize(x)
        cache.codes.view(-1, *x.shape[1:]).index_copy_(0, slots, codes)
        cache.params.view(-1, x.shape[1], 2).index_copy_(0, slots, params)
    else:
        cache.view(-1, *x.shape[1:]).index_copy_(0, slots, x)


def gather(cache: torch.Tensor | QuantizedKV, blocks: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The cache's blocks [n] as values [n, block_size, KVH, D] in attention's dtype, written into `out`."""
    if isinstance(cache, QuantizedKV):
        codes = torch.index_select(cache.codes, 0, blocks)
        return dequantize(codes, torch.index_select(cache.params, 0, blocks), cache.dtype, out=out)
    # index_select on a flat table is several times faster than advanced indexing on CPU.
    return torch.index_select(cache, 0, blocks, out=out)
