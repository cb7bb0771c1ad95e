"""Attention through flash-attn's paged variable-length kernel (CUDA, fp16/bf16, pages of 256 tokens)."""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serving.layers.attention_types import KVCache, KVLayout
from serving.utils.context import AttentionContext

logger = logging.getLogger(__name__)

FLASH_DTYPES = (torch.float16, torch.bfloat16)
# flash-attn's paged varlen kernel takes pages of 256 tokens or multiples.
FLASH_PAGE = 256


def load_flash_attn() -> tuple[Callable | None, str]:
    """(flash_attn_varlen_func, "") when flash-attn and its CUDA extension import here, else (None, why).

    A real import, not find_spec: the package can be installed while its compiled extension does not load
    (built against another torch: an undefined-symbol ABI error), which must show at start-up, not on the
    first request.
    """
    try:
        module = importlib.import_module("flash_attn")
        importlib.import_module("flash_attn_2_cuda")
    except ImportError as error:
        return None, f"flash-attn does not import ({type(error).__name__}: {error})"
    except OSError as error:   # a shared-library load failure
        return None, f"flash-attn's CUDA extension does not load ({error})"
    return module.flash_attn_varlen_func, ""


@dataclass
class FlashPlan:
    cu_seqlens_k: torch.Tensor      # [N + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int


class FlashAttnBackend:
    name = "flash_attn"
    workspace_bytes = 0             # reads the cache in place
    # The kernel reads lengths and block tables from device tensors; max_seqlen_k is the context's bound.
    graph_safe = True

    def __init__(self, layout: KVLayout, varlen_func: Callable):
        self.layout = layout
        self._varlen = varlen_func

    def plan(self, ctx: AttentionContext) -> FlashPlan:
        return FlashPlan(F.pad(ctx.seq_lens_k.cumsum(0, dtype=torch.int32), (1, 0)), ctx.max_seqlen_q,
                         ctx.max_seqlen_k)

    def forward(self, q: torch.Tensor, k_cache: KVCache, v_cache: KVCache, ctx: AttentionContext,
                scale: float) -> torch.Tensor:
        plan: FlashPlan = ctx.plan
        return self._varlen(q, k_cache, v_cache, cu_seqlens_q=ctx.cu_seqlens_q, cu_seqlens_k=plan.cu_seqlens_k,
                            max_seqlen_q=plan.max_seqlen_q, max_seqlen_k=plan.max_seqlen_k, softmax_scale=scale,
                            causal=True, block_table=ctx.block_tables)
