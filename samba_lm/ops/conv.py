"""Causal depthwise conv1d with bias, followed by SiLU (Mamba's short convolution).

Shapes (B batch, T time, E channels, K kernel width):
    x [B, T, E]   weight [E, K]   bias [E]   initial_state / final_state [B, E, K-1]

    y_t = silu(bias + sum_k weight[:, k] * x_{t - K + 1 + k}),  x_{<0} taken from initial_state (or 0)

The state is the last K-1 inputs, so a stream cut into chunks convolves exactly like the whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from ._checks import check_float, check_rank, compute_dtype


def causal_conv1d_reference(x, weight, bias=None, initial_state=None):
    cdt = compute_dtype(x.dtype)
    batch, T, E = x.shape
    K = weight.shape[1]
    past = (initial_state.to(cdt) if initial_state is not None
            else torch.zeros(batch, E, K - 1, device=x.device, dtype=cdt))
    xs = torch.cat([past, x.transpose(1, 2).to(cdt)], dim=-1)  # [B, E, K-1+T]
    y = F.conv1d(xs, weight.to(cdt)[:, None, :], bias.to(cdt) if bias is not None else None, groups=E)
    final_state = xs[..., xs.shape[-1] - (K - 1):]
    return F.silu(y).transpose(1, 2).to(x.dtype), final_state.to(x.dtype)


def causal_conv1d(x, weight, bias=None, initial_state=None):
    """Causal depthwise conv + SiLU (see module docstring); returns (y [B, T, E], final_state [B, E, K-1]).

    When no gradient is needed, a backend may write the final state into `initial_state` and return
    that same tensor (the Triton decode step does)."""
    op = "causal_conv1d"
    check_rank(op, "x", x, 3, "[B, T, E]")
    check_rank(op, "weight", weight, 2, "[E, K]")
    batch, T, E = x.shape
    K = weight.shape[1]
    check_float(op, "x", x)
    check_float(op, "weight", weight, (E, K))
    check_float(op, "bias", bias, (E,), optional=True)
    check_float(op, "initial_state", initial_state, (batch, E, K - 1), optional=True)
    fn = dispatch.resolve("causal_conv1d", x.device, x.dtype)
    return fn(x, weight, bias, initial_state)


dispatch.register("causal_conv1d", "reference", causal_conv1d_reference)
