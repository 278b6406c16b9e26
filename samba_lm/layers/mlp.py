"""SwiGLU MLP: down(silu(gate(x)) * up(x)), no biases; gate and up share one matmul."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def init_state(self, batch_size, device=None, dtype=None):
        return None

    def forward(self, x, positions=None, state=None):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
