"""The fused elementwise CPU kernels (serving/kernels/fused_ops.c) against the layers' torch formulas, which
run where no compiler is found.

Tolerances: the kernels compute in float32 like torch but in another order (a sum of squares split over
SIMD lanes, multiply-adds contracted to FMAs, a vectorised expf within a few ulp of torch's), so results
agree to a few float32 ulps: rtol 1e-6 on values of order one (float32's ulp is 1.2e-7 relative), atol 1e-6
for the near-zero values where a difference of one rounding is relatively large. What must not differ at
all does not: the residual sum (one exactly rounded add either way), v, and a row alone against the same
row in a batch.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from serving import kernels
from serving.kernels import fused
from serving.layers.activation import SiluAndMul
from serving.layers.norm import RMSNorm
from serving.layers.rotary import split_rotary

TOL = {"rtol": 1e-6, "atol": 1e-6}


@pytest.fixture(autouse=True)
def _needs_compiler() -> None:
    if kernels._library("fused_ops.c") is None:
        pytest.fail("the CPU kernels should build on the test machine")


def _torch_path(monkeypatch: pytest.MonkeyPatch, fn: Callable[[], Any]) -> Any:
    """fn() as on a machine without a C compiler: the layers' pure-torch formulas."""
    with monkeypatch.context() as m:
        m.setenv("CC", "/nonexistent/cc")
        kernels._library.cache_clear()
        try:
            assert kernels._library("fused_ops.c") is None
            return fn()
        finally:
            kernels._library.cache_clear()


def _norm(width: int, seed: int) -> RMSNorm:
    norm = RMSNorm(width, eps=1e-5)
    norm.weight.copy_(torch.randn(width, generator=torch.Generator().manual_seed(seed)))
    return norm


@pytest.mark.parametrize("shape", [(1, 384), (64, 384), (512, 384), (7, 100), (3, 5, 24)])
@pytest.mark.parametrize("with_residual", [False, True])
@torch.inference_mode()
def test_add_rms_norm_matches_torch(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...],
                                    with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(shape[0])
    x, residual = torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen)
    norm = _norm(shape[-1], shape[0])
    args = (x, residual) if with_residual else (x,)
    got, want = norm(*args), _torch_path(monkeypatch, lambda: norm(*args))
    if with_residual:
        torch.testing.assert_close(got[0], want[0], **TOL)
        assert torch.equal(got[1], want[1])
    else:
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize(("tokens", "heads", "kv_heads", "head_dim"), [
    (1, 6, 2, 64),      # llama-prop at batch 1
    (64, 6, 2, 64),     # llama-prop's decode step
    (5, 4, 4, 128),     # head_dim 128, no GQA
    (3, 3, 1, 10),      # half a head (5) is not a multiple of the SIMD width
])
@torch.inference_mode()
def test_rotary_matches_torch(monkeypatch: pytest.MonkeyPatch, tokens: int, heads: int, kv_heads: int,
                              head_dim: int) -> None:
    gen = torch.Generator().manual_seed(tokens * head_dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    cos_sin = (torch.randn(tokens, 1, head_dim, generator=gen), torch.randn(tokens, 1, head_dim, generator=gen))
    want = _torch_path(monkeypatch, lambda: split_rotary(qkv.clone(), heads, kv_heads, head_dim, cos_sin))
    got = split_rotary(qkv, heads, kv_heads, head_dim, cos_sin)
    assert got[0].is_contiguous() and [t.shape for t in got] == [t.shape for t in want]
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
    assert torch.equal(got[2], want[2])


def test_rotary_on_a_slice_of_a_wider_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows further apart than one projection (a view) are read and rotated at their own stride."""
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(4, 3 * 64 + 32, generator=gen)
    cos_sin = (torch.randn(4, 1, 64, generator=gen), torch.randn(4, 1, 64, generator=gen))
    want = _torch_path(monkeypatch, lambda: split_rotary(wide.clone()[:, :192], 1, 1, 64, cos_sin))
    got = split_rotary(wide[:, :192], 1, 1, 64, cos_sin)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize(("rows", "width"), [(1, 1024), (64, 1024), (512, 1024), (9, 13)])
@torch.inference_mode()
def test_silu_and_mul_matches_torch(monkeypatch: pytest.MonkeyPatch, rows: int, width: int) -> None:
    x = torch.randn(rows, 2 * width, generator=torch.Generator().manual_seed(rows)) * 4
    act = SiluAndMul()
    torch.testing.assert_close(act(x), _torch_path(monkeypatch, lambda: act(x)), **TOL)
    strided = torch.cat([x, x[:, :3]], dim=1)[:, :2 * width]
    torch.testing.assert_close(act(strided), act(x), rtol=0, atol=0)


@torch.inference_mode()
def test_rows_do_not_depend_on_the_batch() -> None:
    """A row's outputs are bit-identical alone and in a batch large enough to be split over threads."""
    gen = torch.Generator().manual_seed(3)
    x, residual = torch.randn(512, 384, generator=gen), torch.randn(512, 384, generator=gen)
    norm = _norm(384, 3)
    assert torch.equal(norm(x, residual)[0][300:301], norm(x[300:301], residual[300:301])[0])
    gate_up = torch.randn(512, 2048, generator=gen)
    assert torch.equal(SiluAndMul()(gate_up)[300:301], SiluAndMul()(gate_up[300:301]))
    qkv = torch.randn(512, 640, generator=gen)
    cos_sin = (torch.randn(512, 1, 64, generator=gen), torch.randn(512, 1, 64, generator=gen))
    q_all = split_rotary(qkv.clone(), 6, 2, 64, cos_sin)[0][300:301]
    one = split_rotary(qkv[300:301].clone(), 6, 2, 64, (cos_sin[0][300:301], cos_sin[1][300:301]))[0]
    assert torch.equal(q_all, one)


def test_inputs_the_kernels_were_not_written_for_fall_back() -> None:
    """Other dtypes, strides and mismatched shapes get None (the layer's torch path), never a C call."""
    x, weight = torch.randn(4, 16), torch.ones(16)
    assert fused.add_rms_norm(x.double(), None, weight.double(), 1e-6) is None
    assert fused.add_rms_norm(x.t(), None, torch.ones(4), 1e-6) is None                # not contiguous
    assert fused.add_rms_norm(x, torch.randn(1, 16), weight, 1e-6) is None               # broadcast residual
    assert fused.add_rms_norm(x, None, torch.ones(8), 1e-6) is None                     # weight's width
    assert fused.add_rms_norm(x, None, weight, 1e-6) is not None

    cos = sin = torch.randn(4, 1, 8)
    assert fused.rotary_qkv(torch.randn(4, 32), 2, 1, 8, cos, sin) is not None
    assert fused.rotary_qkv(torch.randn(4, 30), 2, 1, 8, cos, sin) is None              # qkv's width
    assert fused.rotary_qkv(torch.randn(4, 28), 2, 1, 7, cos[..., :7], sin[..., :7]) is None  # odd head_dim
    assert fused.rotary_qkv(torch.randn(4, 32), 2, 1, 8, cos[:3], sin[:3]) is None      # table rows
    assert fused.rotary_qkv(torch.randn(32, 4).t(), 2, 1, 8, cos, sin) is None          # column stride
    assert fused.rotary_qkv(torch.randn(4, 32).bfloat16(), 2, 1, 8, cos, sin) is None

    assert fused.silu_and_mul(torch.randn(4, 7)) is None                                # odd width
    assert fused.silu_and_mul(torch.randn(2, 4, 8)) is None                             # not 2-D
    assert fused.silu_and_mul(torch.randn(8, 4).t()) is None
