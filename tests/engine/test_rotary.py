"""RoPE tables for every rope type are built where the model is: under the loader's torch.device context
(meta here, CUDA on a GPU) every buffer of the model lands on that device."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from serving.layers.rotary import RotaryEmbedding
from serving.models.llama import LlamaForCausalLM

ROPE = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                 "original_max_position_embeddings": 64},
}


def _config(rope: str) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, max_position_embeddings=256, rope_scaling=ROPE[rope])


@pytest.mark.parametrize("rope", list(ROPE))
def test_every_buffer_follows_the_device_context(rope: str):
    config = _config(rope)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    tensors = dict(model.named_buffers()) | dict(model.named_parameters())
    assert any("cos_cache" in name for name in tensors)
    assert {name: t.device.type for name, t in tensors.items() if t.device.type != "meta"} == {}
    # The same tables as built on the CPU directly.
    on_cpu = RotaryEmbedding(config, 256)
    with torch.device("meta"):
        on_meta = RotaryEmbedding(config, 256)
    assert on_meta.cos_cache.shape == on_cpu.cos_cache.shape == (256, 16)
    assert torch.isfinite(on_cpu.cos_cache).all() and torch.isfinite(on_cpu.sin_cache).all()
