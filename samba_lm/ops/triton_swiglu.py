"""SwiGLU in Triton: forward and backward, one kernel each.

Layout (as `swiglu.py`): x [..., 2H] with the last dim contiguous, read in place through its leading
strides (`triton_norm.as_rows`: a [B, T, 2H] view needs no copy); y [..., H] and dx [..., 2H] come out
contiguous in x's dtype. One program per (row, BLOCK_H hidden units) loads the gate and the up halves
of its units, computes in fp32 and rounds once. The forward is one launch for any shape.
Backward: with sig = sigmoid(gate), d up = dy * gate * sig and d gate = dy * up * sig * (1 + gate *
(1 - sig)), written side by side into dx by one kernel; nothing is saved but x.
What the reference covers that this does not: float64, CPUs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_norm import as_rows


@triton.jit
def _swiglu_kernel(x_ptr, dy_ptr, out_ptr, T, H, s_b, s_t, BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: rows * 2H may pass 2^31
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = j < H
    x_row = x_ptr + (row // T) * s_b + (row % T) * s_t
    gate = tl.load(x_row + j, mask=m, other=0.0).to(tl.float32)
    up = tl.load(x_row + H + j, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    if BACKWARD:
        dy = tl.load(dy_ptr + row * H + j, mask=m, other=0.0).to(tl.float32)
        d_gate = dy * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(out_ptr + row * 2 * H + j, d_gate.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(out_ptr + row * 2 * H + H + j, (dy * gate * sig).to(out_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(out_ptr + row * H + j, (gate * sig * up).to(out_ptr.dtype.element_ty), mask=m)


def _output(x, backward: bool):
    """y [..., H] or dx [..., 2H], contiguous: the launcher's output, also the fake implementation's."""
    return x.new_empty(x.shape) if backward else x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


def _launch(x, dy, backward: bool):
    out = _output(x, backward)
    if out.numel() == 0:
        return out
    x3 = as_rows(x)
    H = x.shape[-1] // 2
    block = min(1024, triton.next_power_of_2(H))
    grid = (x3.shape[0] * x3.shape[1], triton.cdiv(H, block))  # rows first: grid axis 1 stops at 65535
    _swiglu_kernel[grid](x3, dy if backward else out, out, x3.shape[1], H, x3.stride(0), x3.stride(1),
                         BACKWARD=backward, BLOCK_H=block, num_warps=4)
    return out


def swiglu_forward(x):
    return _launch(x, None, backward=False)


def swiglu_backward(dy, x):
    return _launch(x, dy.contiguous(), backward=True)


@torch.library.custom_op("samba_lm::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(x: torch.Tensor) -> torch.Tensor:
    return swiglu_forward(x)


@_swiglu_fwd_op.register_fake
def _(x):
    return _output(x, backward=False)


@torch.library.custom_op("samba_lm::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return swiglu_backward(dy, x)


@_swiglu_bwd_op.register_fake
def _(dy, x):
    return _output(x, backward=True)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _swiglu_bwd_op(dy, x)


torch.library.register_autograd("samba_lm::swiglu_fwd", _backward, setup_context=_setup)


def swiglu_triton(x):
    return _swiglu_fwd_op(x)
