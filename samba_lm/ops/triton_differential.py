"""Differential attention's mix in Triton, without gradients: one kernel for what the reference does
in some fifteen launches (see `differential.py`).

Layout: out [B, T, H, 2 Dh] with the last dim contiguous (batch, time and head strides are free); y
[B, T, H/2, 2 Dh] contiguous in weight's dtype. One program per (row, output head h) makes
lambda from the four [Dh] vectors (their products rounded in the parameters' dtype, as the reference
multiplies them, then summed in fp32), reads heads 2h (first half) and 2h + 1 (second half),
rounds the difference to out's dtype, normalises it in fp32 and rounds where add_rmsnorm does, then
scales by 1 - lambda_init and rounds once more. A call that needs gradients runs the reference's
composition (its add_rmsnorm is a Triton op). What the reference covers that this does not: float64,
CPUs, gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .differential import differential_mix_reference


@triton.jit
def _product_sum(a_ptr, b_ptr, j, jm):
    """sum(a * b) in fp32, each product rounded to the vectors' dtype first, as the reference has it
    (the multiply upcast explicitly: Triton's CPU interpreter mis-multiplies bf16 operands)."""
    a = tl.load(a_ptr + j, mask=jm, other=0.0)
    product = (a.to(tl.float32) * tl.load(b_ptr + j, mask=jm, other=0.0).to(tl.float32)).to(a.dtype)
    return tl.sum(product.to(tl.float32), axis=0)


@triton.jit
def _mix_kernel(out_ptr, lq1_ptr, lk1_ptr, lq2_ptr, lk2_ptr, w_ptr, y_ptr, T, H2, s_b, s_t, s_h,
                lambda_init, scale, eps, DH: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: rows * H * 2 Dh may pass 2^31
    h = tl.program_id(1)
    b, t = row // T, row % T
    j = tl.arange(0, BLOCK_L)
    jm = j < DH
    lam = lambda_init + tl.exp(_product_sum(lq1_ptr, lk1_ptr, j, jm)) - tl.exp(_product_sum(lq2_ptr, lk2_ptr, j, jm))
    d = tl.arange(0, BLOCK_D)
    dm = d < 2 * DH
    base = out_ptr + b * s_b + t * s_t + d
    a1 = tl.load(base + 2 * h * s_h, mask=dm, other=0.0)
    a2 = tl.load(base + (2 * h + 1) * s_h, mask=dm, other=0.0)
    diff = (a1.to(tl.float32) - lam * a2.to(tl.float32)).to(a1.dtype).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / (2 * DH) + eps)
    w = tl.load(w_ptr + d, mask=dm, other=0.0)
    y = (diff * rstd * w.to(tl.float32)).to(w.dtype).to(tl.float32) * scale
    tl.store(y_ptr + (row * H2 + h) * 2 * DH + d, y.to(y_ptr.dtype.element_ty), mask=dm)


def _output(out, weight):
    batch, T, H, width = out.shape
    return out.new_empty(batch, T, H // 2, width, dtype=weight.dtype)


@torch.library.custom_op("samba_lm::differential_mix", mutates_args=())
def _mix_op(out: torch.Tensor, lambda_q1: torch.Tensor, lambda_k1: torch.Tensor, lambda_q2: torch.Tensor,
            lambda_k2: torch.Tensor, weight: torch.Tensor, lambda_init: float, eps: float) -> torch.Tensor:
    y = _output(out, weight)
    batch, T, H, width = out.shape
    if y.numel() == 0:
        return y
    if out.stride(-1) != 1:
        out = out.contiguous()
    lambdas = [t.contiguous() for t in (lambda_q1, lambda_k1, lambda_q2, lambda_k2)]
    _mix_kernel[(batch * T, H // 2)](out, *lambdas, weight.contiguous(), y, T, H // 2, out.stride(0), out.stride(1),
                                      out.stride(2), lambda_init, 1.0 - lambda_init, eps, DH=width // 2,
                                      BLOCK_L=triton.next_power_of_2(width // 2),
                                      BLOCK_D=triton.next_power_of_2(width), num_warps=1 if width <= 256 else 4)
    return y


@_mix_op.register_fake
def _(out, lambda_q1, lambda_k1, lambda_q2, lambda_k2, weight, lambda_init, eps):
    return _output(out, weight)


def differential_mix_triton(out, lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init, weight, eps):
    tensors = (out, lambda_q1, lambda_k1, lambda_q2, lambda_k2, weight)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return differential_mix_reference(out, lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init, weight, eps)
    return _mix_op(out, lambda_q1, lambda_k1, lambda_q2, lambda_k2, weight, lambda_init, eps)
