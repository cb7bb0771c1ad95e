"""Attention over the paged KV cache, and the choice of the backend that computes it.

`Attention` writes the step's new keys/values into the cache, then hands the query to the runner's backend,
which attends over each sequence's cached context with the plan the runner made for the step. Backends:
torch SDPA (CPU, and CUDA without flash-attn; serving/layers/sdpa_backend.py), flash-attn (CUDA;
flash_backend.py) and, on CPU in float32, a native kernel for decodes and short-context prefills (SDPA for
the others). With an int8 KV cache (kv_quant) new entries are quantized as they are written; SDPA
dequantizes the blocks it gathers and the native kernel reads the int8 codes directly.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from serving.kernels import paged_decode_attention
from serving.layers import kv_quant
from serving.layers.attention_types import AttentionBackend, KVCache, KVLayout
from serving.layers.flash_backend import FLASH_DTYPES, FLASH_PAGE, FlashAttnBackend, load_flash_attn
from serving.layers.sdpa_backend import CpuKernelBackend, SdpaBackend
from serving.utils.context import get_context

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "flash_attn", "cpu_kernel")
# block_size=None (auto) where flash-attn does not run: small blocks waste little of a sequence's last block.
SMALL_BLOCK = 16


def _flash_attn_unusable(device: torch.device, dtype: torch.dtype, block_size: int, kv_cache_dtype: str,
                         check_import: bool = True) -> str | None:
    """Why flash-attn cannot run this configuration here; None when it can (its extension imports, unless
    check_import is False: a plan for GPUs that have it)."""
    if device.type != "cuda":
        return f"it needs a CUDA device (got {device.type})"
    if dtype not in FLASH_DTYPES:
        return f"it computes in float16 or bfloat16 only (got dtype={str(dtype).removeprefix('torch.')})"
    if block_size % FLASH_PAGE:
        return f"its paged kernel needs block_size % {FLASH_PAGE} == 0 (got {block_size})"
    if kv_cache_dtype != "auto":
        # flash-attn's paged kernel reads the cache in the query dtype and has no per-token scales.
        return f"it does not support kv_cache_dtype={kv_cache_dtype!r} (use 'sdpa' with an int8 KV cache)"
    if not check_import:
        return None
    varlen, why = load_flash_attn()
    return why if varlen is None else None


def _choose_backend(name: str, device: torch.device, dtype: torch.dtype, block_size: int, kv_cache_dtype: str,
                    check_import: bool = True) -> tuple[str, str]:
    """select_backend's choice, and why it is not flash-attn ("" when it is, or when it was not considered)."""
    if name not in BACKENDS:
        raise ValueError(f"invalid attention_backend={name!r}: expected one of {', '.join(BACKENDS)}")
    kernel_fits = device.type == "cpu" and dtype == torch.float32
    if name == "cpu_kernel" or (name == "auto" and kernel_fits):
        if kernel_fits and paged_decode_attention() is not None:
            return "cpu_kernel", ""
        if name == "cpu_kernel":
            raise ValueError("attention_backend='cpu_kernel' needs a float32 CPU model and a C compiler with "
                             "OpenMP (see the log for the build error)")
    if name == "sdpa":
        return "sdpa", ""
    why = _flash_attn_unusable(device, dtype, block_size, kv_cache_dtype, check_import)
    if why is None:
        return "flash_attn", ""
    if name == "flash_attn":
        raise ValueError(f"attention_backend='flash_attn' cannot run here: {why}")
    return "sdpa", why


def select_backend(name: str, device: torch.device, dtype: torch.dtype, block_size: int,
                   kv_cache_dtype: str = "auto") -> str:
    """The backend for a configured name. auto: flash-attn on CUDA when it imports, computes in fp16/bf16,
    the block size suits its paged kernel and the KV cache is in the model dtype; on CPU in float32 the
    native decode kernel when it builds here (float or int8 KV); else SDPA (which dequantizes an int8 cache
    block by block). A backend asked for by name that cannot run is an error saying why."""
    backend, why = _choose_backend(name, device, dtype, block_size, kv_cache_dtype)
    if why and device.type == "cuda":
        logger.info("not using flash-attn (%s); using SDPA", why)
    return backend


def auto_block_size(name: str, device: torch.device, dtype: torch.dtype, kv_cache_dtype: str = "auto",
                    check_import: bool = True) -> tuple[int, str]:
    """block_size=None's value, and why: flash-attn's page (FLASH_PAGE) where select_backend picks flash-attn
    given blocks of that size, else SMALL_BLOCK. A backend asked for by name that cannot run is
    select_backend's error; flash_attn by name that can takes its page."""
    backend, why = _choose_backend(name, device, dtype, FLASH_PAGE, kv_cache_dtype, check_import)
    if backend == "flash_attn":
        return FLASH_PAGE, f"flash_attn's paged kernel takes blocks of {FLASH_PAGE} tokens"
    return SMALL_BLOCK, f"{backend} attention" + (f" (not flash-attn: {why})" if why else "")


def make_backend(name: str, layout: KVLayout) -> AttentionBackend:
    """The backend object `select_backend` named, for one rank's attention geometry."""
    if name == "cpu_kernel":
        kernel = paged_decode_attention()
        if kernel is None:
            raise ValueError("the CPU attention kernel does not build here")
        return CpuKernelBackend(layout, kernel)
    if name == "flash_attn":
        varlen, why = load_flash_attn()
        if varlen is None:
            raise ValueError(f"attention_backend='flash_attn' cannot run here: {why}")
        return FlashAttnBackend(layout, varlen)
    if name == "sdpa":
        return SdpaBackend(layout)
    raise ValueError(f"no attention backend named {name!r}")


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        # Assigned by the runner (kv_cache.attach): the backend, and views into its one KV allocation,
        # [num_blocks, block_size, KVH, D] in the model dtype, or int8 codes with their scales (QuantizedKV).
        self.backend: AttentionBackend | None = None
        self.k_cache: KVCache = torch.empty(0)
        self.v_cache: KVCache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] -> [T, H * D]."""
        ctx = get_context()
        kv_quant.write(self.k_cache, k, ctx.slot_mapping)
        kv_quant.write(self.v_cache, v, ctx.slot_mapping)
        out = self.backend.forward(q, self.k_cache, self.v_cache, ctx, self.scale)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
