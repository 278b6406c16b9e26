"""RMSNorm (weight only), computed in float32 whatever the input dtype."""

from __future__ import annotations

import torch
from torch import nn

from ..ops._checks import compute_dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(compute_dtype(x.dtype))
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # Output in the weight's dtype: a bf16 model gets bf16, autocast casts at the next matmul.
        return (y * self.weight.to(y.dtype)).to(self.weight.dtype)
