"""oneDNN-packed float32 CPU weights: the product against F.linear, the dispatch in serving/layers/linear.py,
and the engine with and without them (the default engine's parity with transformers is tested elsewhere)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serving import LLM, SamplingParams
from serving.layers import linear as linear_module
from serving.layers.embed_head import ParallelLMHead
from serving.layers.linear import LinearBase
from serving.layers.packed_weights import PACKED_MIN_ROWS, pack, packed_linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize(("rows", "out_features", "in_features"), [
    (PACKED_MIN_ROWS, 640, 384),   # llama-prop's fused QKV at the smallest packed step
    (64, 4096, 384),               # the LM head at a decode batch of 64
    (513, 1030, 100),              # a prefill chunk; dimensions no SIMD width divides
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_product_matches_f_linear(rows: int, out_features: int, in_features: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows + out_features)
    x = torch.randn(rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    # Another summation order than torch's GEMM: float32 rounding over K terms of magnitude ~sqrt(K).
    torch.testing.assert_close(packed_linear(x, pack(weight), bias), F.linear(x, weight, bias),
                               atol=1e-4, rtol=1e-5)


def test_dispatch_uses_the_packed_copy_only_for_enough_float32_rows() -> None:
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(96, 48, generator=gen)
    packed = pack(weight)
    many = torch.randn(PACKED_MIN_ROWS, 48, generator=gen)
    assert torch.equal(linear_module.linear(many, weight, packed=packed), packed_linear(many, packed, None))
    # Fewer rows: the small-batch path, the same as without a packed copy.
    few = many[: PACKED_MIN_ROWS - 1]
    assert torch.equal(linear_module.linear(few, weight, packed=packed), linear_module.linear(few, weight))
    # A row's outputs do not depend on how many other rows share the packed step.
    assert torch.equal(linear_module.linear(torch.cat([many, many]), weight, packed=packed)[:PACKED_MIN_ROWS],
                       linear_module.linear(many, weight, packed=packed))


def test_pack_refuses_what_onednn_cannot_take() -> None:
    with pytest.raises(ValueError, match="cannot pack a torch.bfloat16 weight"):
        pack(torch.randn(4, 4, dtype=torch.bfloat16))


def _packed_modules(llm: LLM) -> list[torch.nn.Module]:
    model = llm.engine.executor.runner.model
    return [m for m in model.modules() if isinstance(m, (LinearBase, ParallelLMHead))]


def test_engine_tokens_and_logprobs_with_and_without_packed_weights(llama_dir) -> None:
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 17, 90, 12, 33, 64, 8, 25, 71)]   # 10 rows per decode
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    runs = {}
    for packed in (True, False):
        llm = LLM(str(llama_dir), num_kv_blocks=256, packed_weights=packed, enable_prefix_caching=False)
        modules = _packed_modules(llm)
        assert modules and all((m.packed_weight is not None) == packed for m in modules)
        runs[packed] = llm.generate(prompts, params)
    for with_packed, plain in zip(runs[True], runs[False]):
        assert with_packed.outputs[0].token_ids == plain.outputs[0].token_ids
        chosen = lambda out: [step[t] for step, t in zip(out.logprobs, out.token_ids)]
        torch.testing.assert_close(torch.tensor(chosen(with_packed.outputs[0])),
                                   torch.tensor(chosen(plain.outputs[0])), atol=1e-4, rtol=0)


def test_int8_weights_are_not_packed(llama_dir) -> None:
    llm = LLM(str(llama_dir), num_kv_blocks=256, quantization="int8")
    layers = [m for m in _packed_modules(llm) if isinstance(m, LinearBase)]
    assert layers and all(m.packed_weight is None for m in layers)
