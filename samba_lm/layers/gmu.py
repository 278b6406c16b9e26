"""The gated memory unit (SambaY): out_proj(memory * silu(in_proj(x))), where the memory is the
pre-gate scan output y = C.h + D x of the latest "mamba_mem" layer below, at the same positions. It
keeps no state of its own: a token's memory is the current token's."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..ops import linear


class GMU(nn.Module):
    def __init__(self, d_model: int, d_inner: int):
        super().__init__()
        self.in_proj = nn.Linear(d_model, d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def init_state(self, batch_size, device=None, dtype=None):
        return None

    def forward(self, x, positions=None, state=None, documents=None, memory=None):
        if memory is None:
            raise ValueError("a GMU needs the memory of a 'mamba_mem' layer before it")
        return linear(memory * F.silu(linear(x, self.in_proj.weight)), self.out_proj.weight)
