"""Linear layers sharded for tensor parallelism.

Each parameter carries a ``weight_loader`` that copies only this rank's slice from a checkpoint tensor.
The checkpoint tensor may be a lazy safetensors slice: indexing it reads just the requested rows or
columns from disk, so no rank materialises the whole matrix. After loading, `quantize_int8` can replace a
layer's weight shard by int8 codes and per-output-channel scales (serving/layers/int8_weights.py).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from serving.kernels import small_linear
from serving.layers.int8_weights import int8_linear, quantize_per_channel
from serving.layers.packed_weights import PACKED_MIN_ROWS, can_pack, pack, packed_linear
from serving.parallel.state import get_tp_rank, get_tp_world_size

# Rows of x up to which a float32 CPU product runs in the native kernel (serving/kernels/small_linear.c):
# there torch's BLAS streams the weights on one thread (measured with 2 threads on llama-prop's and the tiny
# model's weights: the kernel 1.6x faster at 16 rows, 2.4x at 1; on one thread the two are even at 16 rows).
SMALL_LINEAR_MAX_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`. For float32 CPU activations (not under torch.compile, which traces F.linear): a step of
    more than a few rows uses the weight's packed copy when there is one (serving/layers/packed_weights.py),
    a decode step's few rows the native kernel."""
    if (x.dim() == 2 and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.compiler.is_compiling()):
        if packed is not None and x.shape[0] >= PACKED_MIN_ROWS:
            return packed_linear(x, packed, bias)
        if x.shape[0] <= SMALL_LINEAR_MAX_ROWS and weight.is_contiguous():
            kernel = small_linear()
            if kernel is not None:
                return kernel(x.contiguous(), weight, bias)
    return F.linear(x, weight, bias)


def narrow(loaded: Any, dim: int, start: int, size: int) -> torch.Tensor:
    """Slice `size` entries at `start` along `dim` of a tensor or a lazy safetensors slice."""
    index = [slice(None)] * (dim + 1)
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)]


def materialize(loaded: Any) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int):
        super().__init__()
        self.tp_dim = tp_dim
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_world_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.register_parameter("weight_scale", None)   # set by quantize_int8
        self.packed_weight: torch.Tensor | None = None   # set by pack_weight

    def quantize_int8(self) -> None:
        """Replace this rank's float weight by int8 codes (still `weight`) and float32 `weight_scale` [N].

        A row-parallel shard holds part of each output row: its scale is the whole row's (a max-reduce over
        the ranks), so the codes, and the results, are those of the unsharded layer.
        """
        weight = self.weight.data
        absmax = weight.abs().amax(dim=1).float()
        if self.tp_dim == 1 and self.tp_size > 1:
            dist.all_reduce(absmax, op=dist.ReduceOp.MAX)
        codes, scale = quantize_per_channel(weight, absmax)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)

    def pack_weight(self) -> None:
        """Also hold this rank's float32 CPU weight packed for oneDNN (a no-op for int8 or other weights)."""
        if self.weight_scale is None and can_pack(self.weight):
            self.packed_weight = pack(self.weight.data)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight_scale is None:
            return linear(x, self.weight, bias, self.packed_weight)
        return int8_linear(x, self.weight, self.weight_scale, bias)

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        if param.dim() <= self.tp_dim:
            # The bias of a row-parallel layer (added once, after the reduce).
            param.data.copy_(materialize(loaded))
            return
        size = param.shape[self.tp_dim]
        param.data.copy_(narrow(loaded, self.tp_dim, self.tp_rank * size, size))


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank returns its slice (no communication)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, divide(output_size, get_tp_world_size()), bias, tp_dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: int) -> None:
        shard_size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, shard_size).copy_(narrow(loaded, 0, self.tp_rank * shard_size, shard_size))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection split by heads. With fewer KV heads than ranks, KV heads are replicated."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp_size = get_tp_world_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp_size)
        if num_kv_heads >= tp_size:
            self.num_kv_heads = divide(num_kv_heads, tp_size)
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = divide(tp_size, num_kv_heads)
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: str) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank = 0, q_size, self.tp_rank
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, rank = kv_size, self.tp_rank // self.kv_replicas
        param.data.narrow(0, offset, size).copy_(narrow(loaded, 0, rank * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(divide(input_size, get_tp_world_size()), output_size, bias, tp_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bias only on rank 0, so the all-reduce adds it exactly once.
        y = self.matmul(x, self.bias if self.tp_rank == 0 else None)
        if self.tp_size > 1:
            dist.all_reduce(y)
        return y
