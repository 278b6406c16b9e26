"""SwiGLU MLP: down(silu(gate(x)) * up(x)), no biases; gate and up share one matmul, the gate is one op."""

from __future__ import annotations

from torch import nn

from ..ops import linear, swiglu


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def init_state(self, batch_size, device=None, dtype=None):
        return None

    def forward(self, x, positions=None, state=None, documents=None):
        return linear(swiglu(linear(x, self.gate_up_proj.weight)), self.down_proj.weight)
