"""The Mamba mixer between its projections, for training: one op forward and one backward around the
Triton conv and scan, arranged as mamba_ssm's `mamba_inner_fn` arranges its CUDA kernels.

Composed of the conv and scan ops (`mamba.py`), autograd adds two passes over [B, T, E]-sized tensors
that only move data: in_proj's gradient is the concatenation of dx (the conv's) and dz (the scan's),
and the conv output's gradient is the sum of the scan's du and x_proj's. Here the backward writes dz
and dx in place into one [B, T, 2E] buffer (`scan_backward(dz_out=)`, `conv_backward(dx_out=)`) and
x_proj's input gradient is added into the scan's du by the matmul itself (cuBLAS with beta = 1, one
rounding where the composition rounds twice). The forward is the composition's: the same kernels and
matmuls, the same saved tensors (the conv output u, x_proj's output, delta, the scan's carries).

It runs for calls with gradients from fresh streams (no positions, no conv or ssm state given), as
the trainer makes them; the final states come out and take gradients as the composition's do. The
weights enter in xz's dtype (cast by the caller, as autocast casts them for F.linear), A_log, D and
the dt bias in float32. What the composition covers that this does not: positions (left padding),
initial states, float64, CPUs (except under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import tuning
from .triton_conv import conv_backward, conv_forward
from .triton_scan import backward_path, scan_backward, scan_forward
from .triton_scan import _forward_outputs as _scan_outputs


def _split(x_dbl, R, N):
    """x_proj's output [B, T, R + 2N] as (dt, B, C), views."""
    return x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]


def _A(A_log):
    return -torch.exp(A_log.float())


@torch.library.custom_op("samba_lm::mamba_inner_fwd", mutates_args=())
def _fwd_op(xz: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, x_proj_weight: torch.Tensor,
            dt_proj_weight: torch.Tensor, dt_proj_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
            reset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
    """(y, conv_state, ssm_state) and, saved for the backward, (u, x_dbl, delta, carries)."""
    (E, N), R = A_log.shape, dt_proj_weight.shape[1]
    u, conv_final = conv_forward(xz[..., :E], conv_weight, conv_bias, None, reset)
    x_dbl = F.linear(u, x_proj_weight)
    dt, B, C = _split(x_dbl, R, N)
    delta = F.linear(dt, dt_proj_weight)  # the bias is added inside the scan, before softplus
    y, ssm_final, carries = scan_forward(u, delta, _A(A_log), B, C, D.float(), xz[..., E:], dt_proj_bias.float(),
                                         None, True, reset)
    return y, conv_final, ssm_final, u, x_dbl, delta, carries


@_fwd_op.register_fake
def _(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, reset):
    (E, N), (batch, T, _) = A_log.shape, xz.shape
    u = xz.new_empty(batch, T, E)
    y, ssm_final, carries = _scan_outputs(tuning.current("scan"), u, A_log.new_empty(E, N, dtype=torch.float32), True)
    return (y, xz.new_empty(batch, E, conv_weight.shape[1] - 1), ssm_final, u,
            xz.new_empty(batch, T, x_proj_weight.shape[0]), torch.empty_like(u), carries)


@torch.library.custom_op("samba_lm::mamba_inner_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, d_conv_final: torch.Tensor | None, d_ssm_final: torch.Tensor | None, xz: torch.Tensor,
            conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, x_proj_weight: torch.Tensor,
            dt_proj_weight: torch.Tensor, dt_proj_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
            reset: torch.Tensor | None, u: torch.Tensor, x_dbl: torch.Tensor, delta: torch.Tensor,
            carries: torch.Tensor, carry_steps: int, sequential: bool) -> list[torch.Tensor]:
    """d xz, d conv weight, d conv bias (empty without one), d x_proj, d dt_proj weight, d dt bias,
    d A_log, d D."""
    (E, N), R = A_log.shape, dt_proj_weight.shape[1]
    dxz = torch.empty_like(xz)
    A = _A(A_log)
    dt, B, C = _split(x_dbl, R, N)
    du, ddelta, dA, dB, dC, dD, _, dbias, _ = scan_backward(
        dy, d_ssm_final, u, delta, A, B, C, D.float(), xz[..., E:], dt_proj_bias.float(), carries, reset,
        (carry_steps, sequential), dz_out=dxz[..., E:])
    d_dt = ddelta @ dt_proj_weight  # [B, T, R]
    d_dt_proj = ddelta.flatten(0, 1).t() @ dt.flatten(0, 1)
    dx_dbl = torch.cat([d_dt, dB.to(x_dbl.dtype), dC.to(x_dbl.dtype)], dim=-1).flatten(0, 1)
    d_x_proj = dx_dbl.t() @ u.flatten(0, 1)
    du2 = du.view(-1, E)
    torch.addmm(du2, dx_dbl, x_proj_weight, out=du2)  # du += dx_dbl @ W: x_proj's share, added by the matmul
    _, dw, db, _ = conv_backward(du, d_conv_final, xz[..., :E], conv_weight, conv_bias, None, reset,
                                 dx_out=dxz[..., :E])
    return [dxz, dw.to(conv_weight.dtype), db.to(conv_bias.dtype) if conv_bias is not None else dw.new_empty(0),
            d_x_proj, d_dt_proj, dbias.to(dt_proj_bias.dtype), (dA * A).to(A_log.dtype), dD.to(D.dtype)]


@_bwd_op.register_fake
def _(dy, d_conv_final, d_ssm_final, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log,
      D, reset, u, x_dbl, delta, carries, carry_steps, sequential):
    return [torch.empty_like(xz), torch.empty_like(conv_weight),
            torch.empty_like(conv_bias) if conv_bias is not None else conv_weight.new_empty(0),
            torch.empty_like(x_proj_weight), torch.empty_like(dt_proj_weight), torch.empty_like(dt_proj_bias),
            torch.empty_like(A_log), torch.empty_like(D)]


def _setup(ctx, inputs, output):
    xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, reset = inputs
    u, x_dbl, delta, carries = output[3:]
    ctx.mark_non_differentiable(u, x_dbl, delta, carries)
    ctx.save_for_backward(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, reset,
                          u, x_dbl, delta, carries)
    ctx.tunings = dict(scan=tuning.current("scan"), conv=tuning.current("conv"))  # the forward's, for the backward
    batch, T, E = u.shape
    ctx.path = backward_path(batch, T, E, A_log.shape[1], u.device)  # the carries' spacing, the kernels


def _backward(ctx, dy, d_conv_final, d_ssm_final, *_saved):
    saved = ctx.saved_tensors
    conv_bias = saved[2]
    with tuning.tuned(**ctx.tunings):  # autograd's CUDA thread sees the defaults
        grads = _bwd_op(dy.contiguous(), d_conv_final, d_ssm_final, *saved, *ctx.path)
    return (grads[0], grads[1], grads[2] if conv_bias is not None else None, *grads[3:], None)


torch.library.register_autograd("samba_lm::mamba_inner_fwd", _backward, setup_context=_setup)


def mamba_inner_train(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, reset=None):
    """`mamba_inner` with gradients from fresh streams: (y, conv_state, ssm_state)."""
    y, conv_final, ssm_final, *_ = _fwd_op(xz, conv_weight, conv_bias, x_proj_weight.to(xz.dtype),
                                           dt_proj_weight.to(xz.dtype), dt_proj_bias, A_log, D, reset)
    return y, conv_final, ssm_final
