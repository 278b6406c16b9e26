"""Residual add + RMSNorm in Triton: forward and backward, one kernel each; residual add + LayerNorm
through the same forward kernel (CENTER), without gradients.

Layout (as `norm.py`): h and delta [..., D] with the last dim contiguous; a 3-D input [B, T, D] is
read in place through its batch and time strides (a slice of time or of the batch needs no copy),
other ranks are viewed as 3-D [A, R, D] (copied only where no such view exists). s, y [..., D] and the
per-row rstd (fp32) come out contiguous. D is any width: BLOCK_D is the next power of two and the
tail is masked; a whole row sits in registers, which suits model widths (1536 .. 2816 here).

Forward: one program per row adds delta in h's dtype (bit-exact with the reference when compiled;
Triton's CPU interpreter truncates fp32 -> bf16 instead of rounding), writes s, and normalises in
fp32. A decode step (B rows, T = 1) is one launch and three allocations, nothing else: the step is
launch-bound.
Backward: a program owns a run of rows and recomputes n = s * rstd from the saved s and rstd:
    dn = dy * weight,   dx = rstd * (dn - n * mean(dn * n)) + ds,   d weight = sum over rows of dy * n
dx is written as d h (h's dtype) and d delta (delta's dtype) by the same kernel; d weight is summed
per program into a [programs, D] fp32 buffer and then over programs by torch, a fixed order (no
atomics: deterministic). What the reference covers that this does not: float64, CPUs.

LayerNorm (`add_layernorm`): the forward kernel takes the row's mean out before the same rstd and adds
the bias after the weight. A call that needs gradients runs the reference's composition (SambaY trains
through it; torch.compile fuses it); the kernel serves inference, where a norm was six launches.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .norm import add_layernorm_reference


@triton.jit
def _fwd_kernel(h_ptr, delta_ptr, w_ptr, b_ptr, s_ptr, y_ptr, rstd_ptr, T, D, h_sb, h_st, d_sb, d_st, eps,
                HAS_DELTA: tl.constexpr, CENTER: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: rows * D may pass 2^31
    b, t = row // T, row % T
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    s = tl.load(h_ptr + b * h_sb + t * h_st + d, mask=dm, other=0.0)
    if HAS_DELTA:  # as the reference: delta rounded to h's dtype, added, rounded once more
        delta = tl.load(delta_ptr + b * d_sb + t * d_st + d, mask=dm, other=0.0).to(s.dtype)
        s = (s.to(tl.float32) + delta.to(tl.float32)).to(s.dtype)
    tl.store(s_ptr + row * D + d, s, mask=dm)
    x = s.to(tl.float32)
    if CENTER:  # LayerNorm: the row's mean taken out (the masked tail stays 0), a bias added below
        x = tl.where(dm, x - tl.sum(x, axis=0) / D, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(rstd_ptr + row, rstd)
    y = x * rstd * tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if CENTER:
        y += tl.load(b_ptr + d, mask=dm, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + d, y.to(y_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _bwd_kernel(dy_ptr, ds_ptr, s_ptr, rstd_ptr, w_ptr, dh_ptr, ddelta_ptr, dw_ptr, rows, D, rows_per_program,
                HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    w = tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program  # an int64 row: rows * D may pass 2^31
    for row in range(first, tl.minimum(first + rows_per_program, rows)):
        offs = row * D + d
        rstd = tl.load(rstd_ptr + row)
        n = tl.load(s_ptr + offs, mask=dm, other=0.0).to(tl.float32) * rstd
        dy = tl.load(dy_ptr + offs, mask=dm, other=0.0).to(tl.float32)
        dn = dy * w
        dw += dy * n
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / D))
        dx += tl.load(ds_ptr + offs, mask=dm, other=0.0).to(tl.float32)
        tl.store(dh_ptr + offs, dx.to(dh_ptr.dtype.element_ty), mask=dm)
        if HAS_DELTA:
            tl.store(ddelta_ptr + offs, dx.to(ddelta_ptr.dtype.element_ty), mask=dm)
    tl.store(dw_ptr + pid * D + d, dw, mask=dm)


def as_rows(x):
    """x [..., D] as a 3-D tensor [A, R, D] with a unit last stride, a view wherever one exists:
    kernels find row r at (r // R, r % R) through the two leading strides."""
    if x.dim() < 3:
        x = x[(None,) * (3 - x.dim())]
    elif x.dim() > 3:
        x = x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:])
    return x if x.stride(-1) == 1 else x.contiguous()


def _warps(block: int) -> int:
    return min(16, max(1, block // 256))  # about 8 fp32 values per thread for wide rows


def _forward_outputs(h, weight, out_dtype):
    """s, y [..., D] and rstd [...] (fp32): the launcher's outputs, also the fake implementation's."""
    return (h.new_empty(h.shape), h.new_empty(h.shape, dtype=out_dtype or weight.dtype),
            h.new_empty(h.shape[:-1], dtype=torch.float32))


def norm_forward(h, delta, weight, eps: float, out_dtype=None, bias=None):
    """RMSNorm, or with a bias LayerNorm (its rstd is of the centred row)."""
    s, y, rstd = _forward_outputs(h, weight, out_dtype)
    if s.numel() == 0:
        return s, y, rstd
    h3 = as_rows(h)
    d3 = as_rows(delta) if delta is not None else h3
    D = h.shape[-1]
    block = triton.next_power_of_2(D)
    weight = weight.contiguous()
    _fwd_kernel[(s.numel() // D,)](h3, d3, weight, bias.contiguous() if bias is not None else weight, s, y, rstd,
                                   h3.shape[1], D, h3.stride(0), h3.stride(1), d3.stride(0), d3.stride(1), eps,
                                   HAS_DELTA=delta is not None, CENTER=bias is not None, BLOCK_D=block,
                                   num_warps=_warps(block))
    return s, y, rstd


def _backward_outputs(s, weight, delta_dtype):
    """d h, d delta (only with a delta), d weight: the launcher's outputs, also the fake's."""
    return ([s.new_empty(s.shape)] + ([s.new_empty(s.shape, dtype=delta_dtype)] if delta_dtype is not None else [])
            + [weight.new_empty(weight.shape)])


def norm_backward(dy, ds, s, rstd, weight, delta_dtype):
    grads = _backward_outputs(s, weight, delta_dtype)
    D = s.shape[-1]
    rows = s.numel() // D
    if rows == 0:
        grads[-1].zero_()
        return grads
    # Enough programs to fill the GPU, each summing d weight over a run of rows.
    slots = 4 * torch.cuda.get_device_properties(s.device).multi_processor_count if s.device.type == "cuda" else 4
    per_program = triton.cdiv(rows, min(rows, slots))
    programs = triton.cdiv(rows, per_program)
    dw = s.new_empty(programs, D, dtype=torch.float32)
    block = triton.next_power_of_2(D)
    ddelta = grads[1] if delta_dtype is not None else grads[0]  # not written without a delta
    _bwd_kernel[(programs,)](dy.contiguous(), ds.contiguous(), s, rstd, weight.contiguous(), grads[0], ddelta, dw,
                             rows, D, per_program, HAS_DELTA=delta_dtype is not None, BLOCK_D=block,
                             num_warps=_warps(block))
    grads[-1].copy_(dw.sum(0))
    return grads


@torch.library.custom_op("samba_lm::add_rmsnorm_fwd", mutates_args=())
def _norm_fwd_op(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 out_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return norm_forward(h, delta, weight, eps, out_dtype)


@_norm_fwd_op.register_fake
def _(h, delta, weight, eps, out_dtype):
    return _forward_outputs(h, weight, out_dtype)


@torch.library.custom_op("samba_lm::add_rmsnorm_bwd", mutates_args=())
def _norm_bwd_op(dy: torch.Tensor, ds: torch.Tensor, s: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                 delta_dtype: torch.dtype | None) -> list[torch.Tensor]:
    return norm_backward(dy, ds, s, rstd, weight, delta_dtype)


@_norm_bwd_op.register_fake
def _(dy, ds, s, rstd, weight, delta_dtype):
    return _backward_outputs(s, weight, delta_dtype)


def _setup(ctx, inputs, output):
    h, delta, weight, eps, _ = inputs
    s, y, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(s, rstd, weight)
    ctx.delta_dtype = delta.dtype if delta is not None else None


def _backward(ctx, ds, dy, drstd):
    s, rstd, weight = ctx.saved_tensors
    grads = _norm_bwd_op(dy, ds, s, rstd, weight, ctx.delta_dtype)
    return grads[0], grads[1] if ctx.delta_dtype is not None else None, grads[-1], None, None


torch.library.register_autograd("samba_lm::add_rmsnorm_fwd", _backward, setup_context=_setup)


def add_rmsnorm_triton(h, delta, weight, eps, out_dtype=None):
    # With delta None the kernel copies h into s: a custom op's outputs may not alias its inputs.
    s, y, _ = _norm_fwd_op(h, delta, weight, float(eps), out_dtype)
    return s, y


@torch.library.custom_op("samba_lm::add_layernorm", mutates_args=())
def _layernorm_op(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                  eps: float, out_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    s, y, _ = norm_forward(h, delta, weight, eps, out_dtype, bias)
    return s, y


@_layernorm_op.register_fake
def _(h, delta, weight, bias, eps, out_dtype):
    return _forward_outputs(h, weight, out_dtype)[:2]


def add_layernorm_triton(h, delta, weight, bias, eps, out_dtype=None):
    """One kernel without gradients (a decode step: six launches a norm become one); with them the
    reference's composition, which torch.compile fuses."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, delta, weight, bias)):
        return add_layernorm_reference(h, delta, weight, bias, eps, out_dtype)
    return _layernorm_op(h, delta, weight, bias, float(eps), out_dtype)
