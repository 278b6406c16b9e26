"""RMSNorm (weight only) of the residual stream, with the previous sub-layer's output added in the same
op (`ops.add_rmsnorm`): computed in float32 whatever the input dtype."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import add_rmsnorm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, h: torch.Tensor, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, norm(s)) with s = h + delta (h when delta is None). The norm comes in the weight's dtype:
        a bf16 model gets bf16; under autocast the next matmul casts."""
        return add_rmsnorm(h, delta, self.weight, self.eps)
