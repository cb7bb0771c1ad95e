"""Rotary position embedding with every rope type Llama checkpoints use (default, linear, dynamic, llama3,
yarn, longrope). The inverse frequencies come from transformers' own rope functions, so a scaled checkpoint
rotates exactly as it does in the reference implementation; cos/sin are tabulated once per position.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from serving.kernels.fused import rotary_qkv


def _default_inv_freq(config: PretrainedConfig) -> tuple[torch.Tensor, float]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = config.rope_parameters["rope_theta"]
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0


def _tables(config: PretrainedConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (times the attention scaling) of every position, [max_positions, head_dim]."""
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        inv_freq, scaling = _default_inv_freq(config)
    elif rope_type in ROPE_INIT_FUNCTIONS:
        # Dynamic NTK only changes frequencies beyond the trained length; the engine caps max_model_len
        # at that length, so its static frequencies are the ones that apply.
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    else:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: PretrainedConfig, max_positions: int):
        super().__init__()
        # The tables are computed on the CPU in float32 (as transformers computes the frequencies, so they
        # match it bit for bit) and then moved to the device the model is built on: under the loader's
        # `torch.device(...)` context every buffer must end up there, whatever the rope functions create.
        device = torch.get_default_device()
        with torch.device("cpu"):
            cos, sin = _tables(config, max_positions)
        self.register_buffer("cos_cache", cos.to(device), persistent=False)
        self.register_buffer("sin_cache", sin.to(device), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for a step's positions, [T, 1, D]: looked up once per step, shared by every layer."""
        return (self.cos_cache[positions].unsqueeze(1).to(dtype), self.sin_cache[positions].unsqueeze(1).to(dtype))


def apply_rotary(q: torch.Tensor, k: torch.Tensor,
                 cos_sin: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, KVH, D]."""
    cos, sin = cos_sin
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def split_rotary(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                 cos_sin: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, H, D], k and v [T, KVH, D] of a fused projection [T, (H + 2 KVH) * D], q and k rotated. For
    float32 CPU activations a native kernel rotates them straight from the projection's output
    (serving/kernels/fused_ops.c), with no split or cat copies."""
    fused = rotary_qkv(qkv, num_heads, num_kv_heads, head_dim, *cos_sin)
    if fused is not None:
        return fused
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = apply_rotary(q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim), cos_sin)
    return q, k, v.view(-1, num_kv_heads, head_dim)
