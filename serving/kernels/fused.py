"""The fused elementwise kernels of fused_ops.c (residual add + RMSNorm, rotary, SiLU-and-mul, the int8 KV
cache's quantized store) for the layers.

Each function runs its kernel when the inputs fit it (float32 CPU tensors in the layouts below, eager mode,
a C compiler here) and returns None otherwise, for the layer to compute its torch formula instead: on other
devices and dtypes, under torch.compile (which fuses the torch ops itself and cannot trace a ctypes call), and
on any shape or stride the kernel was not written for, since the C code trusts its sizes and would read or
write out of bounds where torch would raise or broadcast.
"""
from __future__ import annotations

import ctypes

import torch

from serving.kernels import _library


def _kernels(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The library, for eager float32 CPU tensors (checked first: under torch.compile nothing else is traced)."""
    if torch.compiler.is_compiling() or not all(t.device.type == "cpu" and t.dtype == torch.float32
                                                for t in tensors):
        return None
    return _library("fused_ops.c")


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(RMSNorm(s) * weight, s) with s = x + residual (s = x and None without a residual); x and residual
    contiguous [..., width], weight [width]."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    lib = _kernels(*tensors)
    width = weight.shape[0] if weight.dim() == 1 else 0
    if lib is None or not (width and x.dim() and x.shape[-1] == width and all(t.is_contiguous() for t in tensors)
                           and (residual is None or residual.shape == x.shape)):
        return None
    out = torch.empty_like(x)
    summed = None if residual is None else torch.empty_like(x)
    lib.add_rms_norm_f32(out.data_ptr(), None if summed is None else summed.data_ptr(), x.data_ptr(),
                         None if residual is None else residual.data_ptr(), weight.data_ptr(),
                         x.numel() // width, width, eps, torch.get_num_threads())
    return out, summed


def _rows(t: torch.Tensor) -> bool:
    """2-D with contiguous, non-overlapping rows (a slice of a wider matrix passes)."""
    return t.dim() == 2 and t.stride(1) == 1 and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1])


def rotary_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """q, k, v [T, heads, head_dim] of a fused projection qkv [T, (H + 2 KVH) * D] with q and k rotated by
    the cos/sin rows [T, ..., D] of their positions (rotate_half layout): q into a new contiguous tensor
    (what attention takes), k in place in qkv (it is only copied into the KV cache); v is qkv's view."""
    lib = _kernels(qkv, cos, sin)
    tokens = qkv.shape[0] if qkv.dim() == 2 else -1
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    tables_fit = all(t.shape[0] == tokens and t.numel() == tokens * head_dim and t.is_contiguous() for t in (cos, sin))
    if lib is None or not (head_dim > 0 and head_dim % 2 == 0 and _rows(qkv) and tables_fit
                           and qkv.shape[1] == q_size + 2 * kv_size):
        return None
    q = qkv.new_empty(tokens, num_heads, head_dim)
    row = qkv.stride(0)
    lib.rotary_f32(q.data_ptr(), qkv.data_ptr(), qkv[:, q_size:].data_ptr(), qkv[:, q_size:].data_ptr(),
                   cos.data_ptr(), sin.data_ptr(), tokens, num_heads, num_kv_heads, head_dim, row, q_size, row,
                   row, torch.get_num_threads())
    k, v = qkv[:, q_size:].split([kv_size, kv_size], dim=-1)
    return q, k.view(tokens, num_kv_heads, head_dim), v.view(tokens, num_kv_heads, head_dim)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up [T, I] of a fused projection x [T, 2 I] = [gate | up]."""
    lib = _kernels(x)
    width = x.shape[1] // 2 if x.dim() == 2 else 0
    if lib is None or not (width and x.shape[1] == 2 * width and _rows(x)):
        return None
    out = x.new_empty(x.shape[0], width)
    lib.silu_and_mul_f32(out.data_ptr(), x.data_ptr(), x.shape[0], width, x.stride(0), torch.get_num_threads())
    return out


def check_slots(slots: torch.Tensor, num_slots: int) -> None:
    """IndexError unless every KV cache slot in `slots` is inside a pool of num_slots: index_copy_ refuses
    one outside, a native write would write there."""
    low, high = (int(v) for v in slots.aminmax())
    if not 0 <= low <= high < num_slots:
        raise IndexError(f"KV cache slots [{low}, {high}] outside the pool of {num_slots}")


def store_int8_kv(codes: torch.Tensor, params: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> bool:
    """Quantize x [T, KVH, D] (float32; rows of [KVH, D] contiguous) into an int8 cache's codes
    [..., KVH, D] int8 and params [..., KVH, 2] float16 at the flat slots [T] int64, exactly as
    serving/layers/kv_quant.py's quantize and two index_copy_ calls would. False (nothing written) where the
    kernel does not fit; IndexError for a slot outside the cache (check_slots)."""
    lib = _kernels(x)
    on_cpu = codes.device.type == params.device.type == slots.device.type == "cpu"
    if lib is None or x.dim() != 3 or not on_cpu:
        return False
    tokens, kv_heads, head_dim = x.shape
    num_slots = codes.numel() // max(kv_heads * head_dim, 1)
    if not (tokens and x.stride(2) == 1 and x.stride(1) == head_dim and x.stride(0) >= kv_heads * head_dim
            and codes.dtype == torch.int8 and params.dtype == torch.float16 and slots.dtype == torch.int64
            and codes.is_contiguous() and params.is_contiguous() and slots.is_contiguous()
            and codes.shape[-2:] == (kv_heads, head_dim) and params.shape[-2:] == (kv_heads, 2)
            and params.numel() == num_slots * kv_heads * 2 and slots.shape == (tokens,)):
        return False
    check_slots(slots, num_slots)
    lib.kv_store_i8(codes.data_ptr(), params.data_ptr(), x.data_ptr(), slots.data_ptr(), tokens, kv_heads,
                    head_dim, x.stride(0), torch.get_num_threads())
    return True
