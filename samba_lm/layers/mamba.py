"""Mamba-1 mixer, unmodified, with mamba_ssm's parameter names and shapes.

    x, z = in_proj(u)                        d -> 2 * d_inner
    x    = silu(conv1d(x))                   depthwise causal, kernel d_conv, with bias
    dt, B, C = x_proj(x)                     d_inner -> dt_rank + 2 * d_state
    y    = selective_scan(x, dt_proj.weight @ dt, -exp(A_log), B, C, D, z, dt_proj.bias)
    out  = out_proj(y)                       d_inner -> d

Everything between the two projections is one op, `ops.mamba_inner` (a single pair of fused kernels
per token when decoding). With `recompute` (the trainer's `--recompute-mamba`), training keeps only
that op's input xz for the backward and runs the op again there: the conv output, delta and the
scan's saved states are not held between the passes (mamba_ssm's checkpoint_lvl=1 recomputes the
first two). With `memory` (SambaY's "mamba_mem"), the layer runs `ops.mamba_inner_ungated` and gates
y * silu(z) itself, and returns the pre-gate y too, as the memory of the gated memory units above.
With a state, tokens at negative positions (left padding) are zeroed
before and after the convolution, so a padded row's conv and SSM state are exactly those of its
unpadded stream.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import torch.nn.functional as F

from ..ops import linear, mamba_inner, mamba_inner_ungated, recomputed
from ..state import MambaState


class Mamba(nn.Module):
    def __init__(self, d_model: int, d_inner: int, d_state: int, d_conv: int, dt_rank: int,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, memory: bool = False):
        super().__init__()
        self.memory = memory
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, d_state, d_conv, dt_rank
        self.dt_range = (dt_min, dt_max, dt_init_floor)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.recompute = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Mamba-1's own rules; the Linear/Conv1d defaults come from their reset_parameters()."""
        dt_min, dt_max, floor = self.dt_range
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        u = torch.rand(self.d_inner, device=self.D.device)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(A).expand(self.d_inner, -1))
        nn.init.ones_(self.D)

    def init_state(self, batch_size: int, device=None, dtype=None):
        ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return MambaState(
            conv=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype))

    def forward(self, x, positions, state=None, documents=None):
        conv_state, ssm_state = state.read() if state is not None else (None, None)
        args = (linear(x, self.in_proj.weight), positions if state is not None else None, self.conv1d.weight[:, 0],
                self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D,
                conv_state, ssm_state) + (() if documents is None else (documents.reset,))  # packed: resets
        inner = mamba_inner_ungated if self.memory else mamba_inner
        if self.recompute and state is None and self.training and torch.is_grad_enabled():
            y, conv_state, ssm_state = recomputed(inner, *args)
        else:
            y, conv_state, ssm_state = inner(*args)
        if state is not None:
            state.write(conv_state, ssm_state)
        if not self.memory:
            return linear(y, self.out_proj.weight)
        z = args[0].chunk(2, dim=-1)[1]
        return linear(y * F.silu(z), self.out_proj.weight), y
