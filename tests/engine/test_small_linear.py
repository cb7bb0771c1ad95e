"""The native small-batch linear kernel against F.linear, and the dispatch in serving/layers/linear.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serving import kernels
from serving.layers import linear as linear_module


@pytest.mark.parametrize(("rows", "out_features", "in_features"), [
    (1, 640, 384),      # llama-prop's fused QKV at batch 1
    (3, 1030, 100),     # output features not a multiple of the kernel's 4-row blocks; odd K
    (16, 4096, 384),    # the LM head at the kernel's largest batch
    (5, 7, 1024),       # fewer outputs than a block per thread
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_f_linear(rows: int, out_features: int, in_features: int, with_bias: bool) -> None:
    kernel = kernels.small_linear()
    assert kernel is not None, "the CPU kernel should build on the test machine"
    gen = torch.Generator().manual_seed(rows * out_features)
    x = torch.randn(rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    torch.testing.assert_close(kernel(x, weight, bias), F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


def test_rows_do_not_depend_on_the_batch() -> None:
    """A row's outputs are bit-identical alone and among others (what keeps greedy decoding batch-invariant)."""
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(16, 384, generator=gen), torch.randn(642, 384, generator=gen)
    alone = linear_module.linear(x[5:6], weight)
    assert torch.equal(linear_module.linear(x, weight)[5:6], alone)
    assert torch.equal(linear_module.linear(x[3:], weight)[2:3], alone)


def test_dispatch_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the row limit, in another dtype, or without a compiler, `linear` is F.linear itself."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 32, generator=gen)
    many = torch.randn(linear_module.SMALL_LINEAR_MAX_ROWS + 1, 32, generator=gen)
    assert torch.equal(linear_module.linear(many, weight), F.linear(many, weight))
    half = torch.randn(2, 32, generator=gen, dtype=torch.bfloat16)
    assert torch.equal(linear_module.linear(half, weight.bfloat16()), F.linear(half, weight.bfloat16()))

    monkeypatch.setenv("CC", "/nonexistent/cc")
    kernels._library.cache_clear()
    kernels.small_linear.cache_clear()
    try:
        x = torch.randn(2, 32, generator=gen)
        assert kernels.small_linear() is None
        assert torch.equal(linear_module.linear(x, weight), F.linear(x, weight))
    finally:
        kernels._library.cache_clear()
        kernels.small_linear.cache_clear()


def test_mismatched_shapes_are_refused_not_read_out_of_bounds() -> None:
    kernel = kernels.small_linear()
    if kernel is None:
        pytest.skip("no C compiler here")
    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="do not match"):
        kernel(x, torch.randn(4, 16), None)
    with pytest.raises(ValueError, match="do not match"):
        kernel(x, weight, torch.randn(5))
