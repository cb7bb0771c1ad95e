"""Small float32 CPU decode steps through all of a Llama model's decoder layers in one native call.

At a decode step of a few rows every op of a layer is short, and the eager layers spend about as long in
Python between the kernels as in them (llama-prop at batch 1: ~2 ms of a ~4.8 ms token). The native step
(serving/kernels/decode_layers.c) runs the same kernels in the same order, so its hidden states are
bit-identical to the eager path's. It applies where the eager path would run exactly those kernels: eager
float32 on the CPU, one rank, unquantized weights without biases, a float32 or int8 KV cache on the native
attention backend, and a pure decode step of fewer rows than the packed-weight matmuls take; anything else
runs the layers as before. (An int8 cache's eager write is the same native store, kv_quant.write, so the
codes match too.)
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import nn

from serving.kernels import llama_decode_layers
from serving.kernels.fused import check_slots
from serving.layers.kv_quant import QuantizedKV
from serving.layers.packed_weights import PACKED_MIN_ROWS
from serving.layers.sdpa_backend import CpuKernelBackend
from serving.parallel.state import get_tp_world_size
from serving.utils.context import AttentionContext

# Rows up to which a step runs natively: those for which every eager matmul takes the small-batch kernel.
NATIVE_DECODE_MAX_ROWS = PACKED_MIN_ROWS - 1


class _Bound:
    """What the native call needs of the model, read once: pointer tables, sizes and constants."""

    def __init__(self, model: nn.Module, kernel: Callable[..., None]) -> None:
        first = model.layers[0]
        attn, mlp = first.self_attn, first.mlp
        self.kernel = kernel
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.hidden_size = first.input_layernorm.weight.shape[0]
        self.intermediate = mlp.down_proj.weight.shape[1]
        self.eps, self.scale = first.input_layernorm.eps, attn.attn.scale
        self.int8_cache = isinstance(attn.attn.k_cache, QuantizedKV)
        self.block_size = attn.attn.k_cache.shape[1]
        self.num_slots = attn.attn.k_cache.shape[0] * self.block_size
        self.final_norm = model.norm.weight
        weights = [w for layer in model.layers for w in (
            layer.input_layernorm.weight, layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight,
            layer.post_attention_layernorm.weight, layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight)]
        # Per layer: k, v (float32), or k, v codes then k, v params (int8; decode_layers.c's order).
        caches = [c for layer in model.layers for c in _cache_tensors(layer.self_attn.attn)]
        self.tensors = [*weights, *caches, self.final_norm]   # alive while their pointers are in use
        self.weights = (ctypes.c_void_p * len(weights))(*(w.data_ptr() for w in weights))
        self.caches = (ctypes.c_void_p * len(caches))(*(c.data_ptr() for c in caches))
        self.num_layers = len(model.layers)
        e, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.scratch_per_row = 3 * e + (q + 2 * kv) + 2 * q + 3 * self.intermediate   # decode_layers.c


def _fits(model: nn.Module) -> bool:
    """Whether every layer is what the native step computes (see the module docstring), with the shapes
    it assumes (the C code trusts them)."""
    first = model.layers[0].self_attn
    heads, kv_heads, head_dim = first.num_heads, first.num_kv_heads, first.head_dim
    e, inter = model.norm.weight.shape[0], model.layers[0].mlp.down_proj.weight.shape[1]

    def plain(linear: nn.Module, shape: tuple[int, int]) -> bool:
        return (linear.bias is None and linear.weight_scale is None and _f32(linear.weight)
                and tuple(linear.weight.shape) == shape)

    for layer in model.layers:
        attn, mlp, core = layer.self_attn, layer.mlp, layer.self_attn.attn
        if not (plain(attn.qkv_proj, ((heads + 2 * kv_heads) * head_dim, e))
                and plain(attn.o_proj, (e, heads * head_dim)) and plain(mlp.gate_up_proj, (2 * inter, e))
                and plain(mlp.down_proj, (e, inter))):
            return False
        if not all(_f32(n.weight) and n.weight.shape == (e,) and n.eps == model.norm.eps
                   for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            return False
        if not (isinstance(core.backend, CpuKernelBackend)
                and _cache_fits(core, first.attn, kv_heads, head_dim) and core.scale == first.attn.scale
                and (core.num_heads, core.num_kv_heads, core.head_dim) == (heads, kv_heads, head_dim)
                and (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (heads, kv_heads, head_dim)):
            return False
    return _f32(model.norm.weight)


def _cache_tensors(attn: nn.Module) -> tuple[torch.Tensor, ...]:
    k, v = attn.k_cache, attn.v_cache
    return (k.codes, v.codes, k.params, v.params) if isinstance(k, QuantizedKV) else (k, v)


def _cache_fits(attn: nn.Module, first: nn.Module, kv_heads: int, head_dim: int) -> bool:
    """A layer's caches in the format of the first layer's, float32 or int8 (QuantizedKV with float16
    parameters), contiguous [blocks, block_size, KVH, D] (params [..., KVH, 2]), all of one shape."""
    k, v, first_k = attn.k_cache, attn.v_cache, first.k_cache
    if isinstance(k, QuantizedKV):
        if not (isinstance(v, QuantizedKV) and isinstance(first_k, QuantizedKV)
                and k.dtype == v.dtype == torch.float32):
            return False
        entries, params = (k.codes, v.codes), (k.params, v.params)
        if not all(p.device.type == "cpu" and p.dtype == torch.float16 and p.is_contiguous()
                   and p.shape == (*k.codes.shape[:3], 2) for p in params):
            return False
        expected_dtype = torch.int8
    else:
        if not isinstance(v, torch.Tensor) or isinstance(first_k, QuantizedKV):
            return False
        entries, expected_dtype = (k, v), torch.float32
    return all(t.device.type == "cpu" and t.dtype == expected_dtype and t.is_contiguous() and t.dim() == 4
               and t.shape[2:] == (kv_heads, head_dim) and t.shape == first_k.shape for t in entries)


def _f32(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


class NativeDecode:
    """Runs a LlamaModel's decoder layers and final norm for a step in one native call, where that applies."""

    def __init__(self) -> None:
        self._bound: _Bound | None = None
        self._checked_cache: object = None   # the first layer's KV cache when the model was last checked

    def __call__(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                 ctx: AttentionContext) -> torch.Tensor | None:
        """The final norm's output [m, E] for the step, or None where the step is not one the native call
        takes (eager only: the runner calls it outside torch.compile)."""
        rows = input_ids.shape[0]
        if ctx.num_prefill_tokens or not 0 < rows <= NATIVE_DECODE_MAX_ROWS or input_ids.device.type != "cpu":
            return None
        if not self.bind(model):
            return None
        bound = self._bound
        hidden = model.embed_tokens(input_ids)
        cos, sin = model.rotary.lookup(positions, hidden.dtype)
        tables, lens, slots = ctx.block_tables, ctx.seq_lens_k, ctx.slot_mapping
        if not (hidden.dtype == cos.dtype == sin.dtype == torch.float32 and hidden.is_contiguous()
                and all(t.is_contiguous() and t.shape[0] == rows for t in (cos, sin, tables, lens, slots))
                and cos.numel() == sin.numel() == rows * bound.head_dim and tables.dim() == 2
                and tables.dtype == lens.dtype == torch.int32 and slots.dtype == torch.int64):
            return None
        check_slots(slots, bound.num_slots)
        scratch = torch.empty(rows * bound.scratch_per_row, dtype=torch.float32)
        bound.kernel(hidden.data_ptr(), scratch.data_ptr(), bound.weights, bound.caches,
                     bound.final_norm.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
                     tables.data_ptr(), lens.data_ptr(), rows, bound.num_layers, bound.hidden_size,
                     bound.num_heads, bound.num_kv_heads, bound.head_dim, bound.intermediate,
                     bound.block_size, tables.shape[1], bound.int8_cache, bound.eps, bound.scale,
                     torch.get_num_threads())
        return hidden

    def bind(self, model: nn.Module) -> bool:
        """Whether the native step applies to the model as it is now (its pointer tables read, the kernel
        built); checked again whenever the KV pool changes (the runner attaches it after loading and binds at
        start, so the kernel's first build is not on a request's path; a test harness may attach another)."""
        cache = model.layers[0].self_attn.attn.k_cache
        if cache is not self._checked_cache:
            self._checked_cache = cache
            kernel = llama_decode_layers() if get_tp_world_size() == 1 and _fits(model) else None
            self._bound = None if kernel is None else _Bound(model, kernel)
        return self._bound is not None
