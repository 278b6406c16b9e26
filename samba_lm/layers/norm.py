"""The residual stream's norms, each with the previous sub-layer's output added in the same call and
computed in float32 whatever the input dtype: RMSNorm (weight only, the paper's; `ops.add_rmsnorm`)
and LayerNorm (weight and bias, `config.norm="layer"`; `ops.add_layernorm`)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import add_layernorm, add_rmsnorm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, h: torch.Tensor, delta: torch.Tensor | None = None, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, norm(s)) with s = h + delta (h when delta is None). The norm comes in `dtype`, by default
        the weight's: a bf16 model gets bf16; a sub-layer under autocast asks for autocast's dtype."""
        return add_rmsnorm(h, delta, self.weight, self.eps, dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, h: torch.Tensor, delta: torch.Tensor | None = None, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, layer_norm(s)) with s = h + delta, as RMSNorm.forward."""
        return add_layernorm(h, delta, self.weight, self.bias, self.eps, dtype)


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The norm `config.norm` names: "rms" or "layer"."""
    return RMSNorm(dim, eps) if kind == "rms" else LayerNorm(dim, eps)
