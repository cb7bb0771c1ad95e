"""Weight-only int8: every linear layer kind against its float version (both matmul routes), the codes of
fused projections equal to quantizing each checkpoint matrix on its own, and the model's logits and memory."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from serving.capacity import Deployment, ModelShape, weight_bytes_per_gpu
from serving.layers import int8_weights
from serving.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from serving.models.loader import load_model, weight_bytes
from tests.fixtures.paged_harness import PagedHarness

GEN = torch.Generator().manual_seed(0)


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN) * 0.05


def _layers() -> dict[str, tuple[torch.nn.Module, list[torch.Tensor]]]:
    """Each layer kind with its checkpoint matrices loaded through its weight_loader."""
    column = ColumnParallelLinear(96, 80, bias=True)
    parts = [_rand(80, 96)]
    column.weight_loader(column.weight, parts[0])
    column.bias.data.copy_(_rand(80))
    merged = MergedColumnParallelLinear(96, [112, 112])
    gate_up = [_rand(112, 96), _rand(112, 96)]
    for shard, w in enumerate(gate_up):
        merged.weight_loader(merged.weight, w, shard)
    qkv = QKVParallelLinear(96, 16, 6, 2)
    q_k_v = [_rand(96, 96), _rand(32, 96), _rand(32, 96)]
    for shard, w in zip("qkv", q_k_v):
        qkv.weight_loader(qkv.weight, w, shard)
    row = RowParallelLinear(112, 96)
    down = [_rand(96, 112)]
    row.weight_loader(row.weight, down[0])
    return {"column": (column, parts), "merged_gate_up": (merged, gate_up), "qkv": (qkv, q_k_v),
            "row": (row, down)}


@pytest.mark.parametrize("kind", ["column", "merged_gate_up", "qkv", "row"])
def test_each_layer_kind_against_its_float_version(kind: str, monkeypatch: pytest.MonkeyPatch):
    layer, checkpoint = _layers()[kind]
    float_weight = layer.weight.data.clone()
    # Both routes, whichever this CPU's kernels make the default above 16 rows.
    monkeypatch.setattr(int8_weights, "PACKED_MAX_ROWS", 16)
    xs = {"packed": torch.randn(3, float_weight.shape[1], generator=GEN),                 # decode rows
          "dequantized": torch.randn(56, float_weight.shape[1], generator=GEN)}
    with torch.inference_mode():
        expected = {route: layer(x) for route, x in xs.items()}
    float_bytes = layer.weight.numel() * layer.weight.element_size()
    layer.quantize_int8()
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.shape == (float_weight.shape[0],)
    # A quarter of the float32 bytes, plus one float32 scale per output row.
    assert layer.weight.numel() + 4 * layer.weight_scale.numel() < 0.27 * float_bytes
    # Fused projections are quantized row by row: the same codes as each checkpoint matrix on its own.
    torch.testing.assert_close(layer.weight, torch.cat([int8_weights.quantize_per_channel(w)[0]
                                                        for w in checkpoint]), rtol=0, atol=0)
    dequantized = layer.weight.float() * layer.weight_scale[:, None]
    assert (dequantized - float_weight).abs().max() <= layer.weight_scale.max() / 2 + 1e-7
    with torch.inference_mode():
        for route, x in xs.items():
            got = layer(x)
            # Against the float layer: int8's own error (~1% of the output's spread).
            error = (got - expected[route]).norm() / expected[route].norm()
            assert 1e-4 < error < 0.03, (route, error)
            # Against the dequantized weight exactly (float32 route), or to bfloat16 activation rounding.
            bias = getattr(layer, "bias", None)
            exact = F.linear(x, dequantized, bias)
            tol = 1e-5 if route == "dequantized" else 1e-2
            assert (got - exact).norm() / exact.norm() < tol, (route, (got - exact).norm() / exact.norm())
        # Where the packed route takes every batch (AVX-512 kernels), many rows see bfloat16's rounding.
        monkeypatch.setattr(int8_weights, "PACKED_MAX_ROWS", math.inf)
        x = xs["dequantized"]
        exact = F.linear(x, dequantized, getattr(layer, "bias", None))
        assert 1e-5 < (layer(x) - exact).norm() / exact.norm() < 1e-2


def test_model_with_int8_weights(peaked_llama_dir: Path):
    """Linear layers quantized, embeddings, LM head and norms untouched; logits close to the float model's."""
    exact = load_model(peaked_llama_dir, torch.float32, torch.device("cpu"))
    model = load_model(peaked_llama_dir, torch.float32, torch.device("cpu"), quantization="int8")
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {dtypes[n] for n in dtypes if n.endswith("proj.weight")} == {torch.int8}
    assert {dtypes[n] for n in dtypes if "norm" in n or "embed" in n or "lm_head" in n} == {torch.float32}
    linear_fp32 = sum(p.numel() * 4 for n, p in exact.named_parameters() if n.endswith("proj.weight"))
    assert weight_bytes(exact) - weight_bytes(model) > 0.74 * linear_fp32
    # The capacity planner's formula is the engine's real allocation.
    shape = ModelShape.load(peaked_llama_dir)
    assert weight_bytes(model) == weight_bytes_per_gpu(shape, Deployment(dtype="float32", quantization="int8"))

    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 1000, (120,), generator=gen).tolist()
    decodes = torch.randint(3, 1000, (12,), generator=gen).tolist()

    def logits(m: torch.nn.Module) -> torch.Tensor:
        harness = PagedHarness(m)
        return torch.cat([harness.step({0: prompt})] + [harness.step({0: [t]}) for t in decodes])

    ours, reference = logits(model), logits(exact)
    agree = (ours.argmax(-1) == reference.argmax(-1)).float().mean()
    kl = F.kl_div(ours.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean")
    print(f"int8 weights: top-1 agreement {agree:.3f} KL {kl:.4f}")
    assert agree >= 0.85 and kl < 0.05, (agree, kl)
