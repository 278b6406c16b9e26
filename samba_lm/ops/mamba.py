"""The Mamba-1 mixer between its two projections: conv, x_proj, dt_proj and the selective scan.

Shapes (B batch, T time, E = d_inner, N = d_state, K = d_conv, R = dt_rank):
    xz [B, T, 2E] (in_proj's output: x, then the gate z)    positions [B, T] (int64) or None
    conv_weight [E, K]   conv_bias [E] or None   x_proj_weight [R + 2N, E]
    dt_proj_weight [E, R]   dt_proj_bias [E]   A_log [E, N]   D [E]
    conv_state [B, E, K-1] or None   ssm_state [B, E, N] (fp32, fp64 in a fp64 model) or None
    reset [B, T] bool or None
    -> y [B, T, E] in xz's dtype, the final conv_state and ssm_state

    x, z     = xz.chunk(2)
    x        = silu(conv1d(x) + conv_bias)          with the conv state (the last K-1 inputs)
    dt, B, C = x_proj(x)                            split R, N, N
    y        = selective_scan(x, dt_proj_weight @ dt, -exp(A_log), B, C, D, z, dt_proj_bias)

Where positions are given, tokens at negative positions are left padding: x is zeroed before and
after the conv, so a padded row's states equal those of its unpadded stream.

Packed documents: reset[b, t] = True marks a document's first token; the conv and the scan both start
afresh there (see `causal_conv1d` and `selective_scan`), so each document, its states and gradients,
are those of the document alone.

The reference composes the ops `causal_conv1d` and `selective_scan` (each dispatching on its own) with
the two projections. It is also what the Triton backend runs for chunks; a one-token call without
gradients (decode) runs two fused kernels there instead of about a dozen launches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from ._checks import check_float, check_positions, check_rank, check_reset_flags
from .conv import causal_conv1d
from .scan import selective_scan


def _fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """A, D and the dt bias enter the scan in float32 even in a bf16 model (as mamba_ssm does)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def mamba_inner_reference(xz, positions, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
                          A_log, D, conv_state=None, ssm_state=None, reset=None):
    return _composed(xz, positions, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
                     conv_state, ssm_state, reset, gate=True)


def _composed(xz, positions, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
              conv_state, ssm_state, reset, gate: bool):
    """The mixer from the ops `causal_conv1d` and `selective_scan`; gate=False leaves out y * silu(z)."""
    x, z = xz.chunk(2, dim=-1)
    z = z if gate else None
    real = None if positions is None else (positions >= 0)[..., None].to(x.dtype)
    if real is not None:
        x = x * real
    x, conv_state = causal_conv1d(x, conv_weight, conv_bias, conv_state, reset)
    if real is not None:
        x = x * real
    R, N = dt_proj_weight.shape[1], A_log.shape[1]
    dt, B, C = F.linear(x, x_proj_weight).split([R, N, N], dim=-1)
    dt = F.linear(dt, dt_proj_weight)  # the bias is added inside the scan, before softplus
    A = -torch.exp(_fp32_or_wider(A_log))
    y, ssm_state = selective_scan(x, dt, A, B, C, _fp32_or_wider(D), z, _fp32_or_wider(dt_proj_bias), ssm_state,
                                  reset)
    return y, conv_state, ssm_state


def mamba_inner(xz, positions, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
                conv_state=None, ssm_state=None, reset=None):
    """The mixer between in_proj and out_proj (see module docstring); returns (y, conv_state, ssm_state).

    reset: optional bool [B, T], True at a document's first token; None is the plain stream. When no
    gradient is needed, a backend may update the given states in place and return those same tensors
    (the Triton decode step does)."""
    args = _checked("mamba_inner", xz, positions, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
                    A_log, D, conv_state, ssm_state, reset)
    return dispatch.resolve("mamba_inner", xz.device, xz.dtype)(*args)


def mamba_inner_ungated(xz, positions, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log,
                        D, conv_state=None, ssm_state=None, reset=None):
    """`mamba_inner` without the gate: the scan's y = C.h + D x before y * silu(z), which SambaY's
    memory layer hands to its gated memory units. The composed ops (each dispatching on its own)."""
    args = _checked("mamba_inner_ungated", xz, positions, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                    dt_proj_bias, A_log, D, conv_state, ssm_state, reset)
    return _composed(*args, gate=False)


def _checked(op, xz, positions, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
             conv_state, ssm_state, reset):
    check_rank(op, "xz", xz, 3, "[B, T, 2E]")
    check_rank(op, "A_log", A_log, 2, "[E, N]")
    check_rank(op, "dt_proj_weight", dt_proj_weight, 2, "[E, R]")
    check_rank(op, "conv_weight", conv_weight, 2, "[E, K]")
    batch, T, two_e = xz.shape
    E, N = A_log.shape
    R, K = dt_proj_weight.shape[1], conv_weight.shape[1]
    if two_e != 2 * E:
        raise ValueError(f"{op}: xz's last dim ({two_e}) must be 2 * d_inner = 2 * {E} (x, then z)")
    check_float(op, "xz", xz)
    if positions is not None:
        check_positions(op, "positions", positions, (batch, T))
    check_float(op, "conv_weight", conv_weight, (E, K))
    check_float(op, "conv_bias", conv_bias, (E,), optional=True)
    check_float(op, "x_proj_weight", x_proj_weight, (R + 2 * N, E))
    check_float(op, "dt_proj_weight", dt_proj_weight, (E, R))
    check_float(op, "dt_proj_bias", dt_proj_bias, (E,))
    check_float(op, "A_log", A_log, (E, N))
    check_float(op, "D", D, (E,))
    check_float(op, "conv_state", conv_state, (batch, E, K - 1), optional=True)
    check_float(op, "ssm_state", ssm_state, (batch, E, N), optional=True)
    check_reset_flags(op, "reset", reset, (batch, T), xz.device)
    return xz, positions, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, \
        conv_state, ssm_state, reset


dispatch.register("mamba_inner", "reference", mamba_inner_reference)
