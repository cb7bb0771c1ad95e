from __future__ import annotations

import torch
from torch import nn

from serving.kernels.fused import add_rms_norm


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 like Llama's reference, with the residual add fused in (in one native pass
    for float32 CPU activations: serving/kernels/fused_ops.c)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        fused = add_rms_norm(x, residual, self.weight, self.eps)
        if fused is not None:
            return fused[0] if residual is None else fused
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
