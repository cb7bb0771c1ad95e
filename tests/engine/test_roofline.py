"""Useful-FLOP and bytes-per-token formulas against a real model: transformers' Llama under torch's FLOP
counter."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from serving.capacity import ModelShape
from serving.roofline import decode_bytes_per_token, request_flops, utilization, workload_flops

# GQA, head_dim 32, untied head: every term of the formulas is distinct.
CONFIG = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=500, max_position_embeddings=256, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(attn_implementation="eager", **CONFIG)).eval()


def test_prompt_flops_match_the_counted_forward(hf_model):
    shape = ModelShape.from_config(CONFIG)
    prompt = 37
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        hf_model(torch.arange(prompt)[None] % CONFIG["vocab_size"], logits_to_keep=1)
    # The eager attention multiplies the full square score matrix; useful work is its causal half.
    per_key = 4 * shape.num_layers * shape.num_heads * shape.head_dim
    full_minus_causal = per_key * (prompt**2 - prompt * (prompt + 1) / 2)
    assert request_flops(shape, prompt, 1) == pytest.approx(counter.get_total_flops() - full_minus_causal)


def test_generated_tokens_add_layers_head_and_growing_attention():
    shape = ModelShape.from_config(CONFIG)
    # Two more output tokens: two more fed tokens (at positions 10 and 11) and two more LM head rows.
    step = request_flops(shape, 10, 3) - request_flops(shape, 10, 1)
    layers = 2 * shape.num_layers * (128 * 128 * 2 + 64 * 128 * 2 + 352 * 128 * 3)
    attention = 4 * shape.num_layers * shape.num_heads * shape.head_dim * (11 + 12)
    assert step == layers * 2 + 2 * 2 * 500 * 128 + attention
    both = request_flops(shape, 10, 3) + request_flops(shape, 5, 1)
    assert workload_flops(shape, [(10, 3), (5, 1)]) == both
    with pytest.raises(ValueError, match="output_len"):
        request_flops(shape, 10, 0)


def test_decode_bytes_read_every_weight_but_the_embedding_table(hf_model):
    shape = ModelShape.from_config(CONFIG)
    params = sum(p.numel() * p.element_size() for p in hf_model.parameters())
    embedding = hf_model.model.embed_tokens.weight
    one_row = embedding.shape[1] * embedding.element_size()
    kv_per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 4
    expected = params - embedding.numel() * embedding.element_size() + one_row + 100 * kv_per_token
    assert decode_bytes_per_token(shape, 100) == expected
    tied = ModelShape.from_config(dict(CONFIG, tie_word_embeddings=True))
    # Tied: the LM head reads the whole table.
    assert decode_bytes_per_token(tied, 0) == params - embedding.numel() * embedding.element_size()
    assert utilization(5.0, 20.0) == 0.25
    with pytest.raises(ValueError):
        utilization(1.0, 0.0)
