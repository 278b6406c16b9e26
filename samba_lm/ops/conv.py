"""Causal depthwise conv1d with bias, followed by SiLU (Mamba's short convolution).

Shapes (B batch, T time, E channels, K kernel width):
    x [B, T, E]   weight [E, K]   bias [E]   initial_state / final_state [B, E, K-1]   reset [B, T] bool

    y_t = silu(bias + sum_k weight[:, k] * x_{t - K + 1 + k}),  x_{<0} taken from initial_state (or 0)

The state is the last K-1 inputs, so a stream cut into chunks convolves exactly like the whole.

Packed documents: reset[b, t] marks the first token of a document. Output t reads input s only if no
document starts in (s, t]; the inputs before its document's first token count as zeros (for a reset
at t = 0 that is the whole initial_state). The final state holds zeros in the slots before the row's
last reset, so that a chunk continuing that document sees what it would see alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from ._checks import check_float, check_rank, check_reset_flags, compute_dtype


def slots_before_last_reset(reset: torch.Tensor, K: int) -> torch.Tensor:
    """[B, 1, K-1] bool: the final state's slots (the inputs at T-K+1 .. T-1) that precede the row's
    last document start; the final state is zero there, and its gradient goes nowhere."""
    T = reset.shape[1]
    t = torch.arange(T, device=reset.device)
    last_start = torch.where(reset, t, -(K - 1)).amax(dim=1, keepdim=True)  # -(K-1): no reset, keep all
    return (torch.arange(T - (K - 1), T, device=reset.device) < last_start)[:, None, :]


def _conv_with_resets(xs, weight, bias, reset):
    """F.conv1d over xs [B, E, K-1+T] (the state's slots, then x) as K masked taps: tap k of output t
    reads the input at s = t-K+1+k only if s is not before t's document start."""
    T, K = reset.shape[1], weight.shape[1]
    t = torch.arange(T, device=xs.device)
    doc_start = torch.where(reset, t, -(K - 1)).cummax(dim=1).values  # [B, T]; -(K-1): every tap seen
    y = torch.zeros_like(xs[..., :T]) if bias is None else bias[:, None].expand_as(xs[..., :T])
    for k in range(K):
        seen = (t - (K - 1) + k >= doc_start)[:, None, :]
        y = y + weight[:, k, None] * torch.where(seen, xs[..., k:k + T], 0.0)
    return y


def causal_conv1d_reference(x, weight, bias=None, initial_state=None, reset=None):
    cdt = compute_dtype(x.dtype)
    batch, T, E = x.shape
    K = weight.shape[1]
    past = (initial_state.to(cdt) if initial_state is not None
            else torch.zeros(batch, E, K - 1, device=x.device, dtype=cdt))
    xs = torch.cat([past, x.transpose(1, 2).to(cdt)], dim=-1)  # [B, E, K-1+T]
    bias = bias.to(cdt) if bias is not None else None
    final_state = xs[..., xs.shape[-1] - (K - 1):]
    if reset is None:
        y = F.conv1d(xs, weight.to(cdt)[:, None, :], bias, groups=E)
    else:
        y = _conv_with_resets(xs, weight.to(cdt), bias, reset)
        final_state = torch.where(slots_before_last_reset(reset, K), 0.0, final_state)
    return F.silu(y).transpose(1, 2).to(x.dtype), final_state.to(x.dtype)


def causal_conv1d(x, weight, bias=None, initial_state=None, reset=None):
    """Causal depthwise conv + SiLU (see module docstring); returns (y [B, T, E], final_state [B, E, K-1]).

    reset: optional bool [B, T], True at a document's first token (see module docstring); None is the
    plain stream. When no gradient is needed, a backend may write the final state into `initial_state`
    and return that same tensor (the Triton decode step does)."""
    op = "causal_conv1d"
    check_rank(op, "x", x, 3, "[B, T, E]")
    check_rank(op, "weight", weight, 2, "[E, K]")
    batch, T, E = x.shape
    K = weight.shape[1]
    check_float(op, "x", x)
    check_float(op, "weight", weight, (E, K))
    check_float(op, "bias", bias, (E,), optional=True)
    check_float(op, "initial_state", initial_state, (batch, E, K - 1), optional=True)
    check_reset_flags(op, "reset", reset, (batch, T), x.device)
    fn = dispatch.resolve("causal_conv1d", x.device, x.dtype)
    return fn(x, weight, bias, initial_state, reset)


dispatch.register("causal_conv1d", "reference", causal_conv1d_reference)
