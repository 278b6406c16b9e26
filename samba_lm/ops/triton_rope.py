"""RoPE on the fused QKV projection in Triton (the QKV epilogue): forward and backward, one kernel each.

Layout (as `rope.py`): qkv [B, T, (H + 2*Hkv) * Dh] with the last dim contiguous (batch and time may
be strided: a view is read in place); q [B, T, H, Dh], k and v [B, T, Hkv, Dh] come out contiguous in
qkv's dtype. cos and sin [B, T, Dh/2] are computed once per call in torch from float64 angles (the
reference's `rope_cos_sin`) and read as fp32. One program per (batch row, BLOCK_T steps) loads them
once and walks every head, rotating q and k in fp32 and copying v.

v is a copy, not a view of qkv: a custom op's outputs may not alias its inputs, and with v copied
nothing downstream keeps the whole qkv projection alive for the backward (attention saves q, k, v).
Backward: the rotation is orthogonal, so dq and dk turn back by the negative angles; the same kernel
writes them and dv into one dqkv buffer. Nothing is saved but cos and sin.
What the reference covers that this does not: float64, CPUs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rope import rope_cos_sin


@triton.jit
def _heads(packed, split, n, cos, sin, mask, HALF: tl.constexpr, ROTATE: tl.constexpr, BACKWARD: tl.constexpr):
    """n heads between packed qkv and a split [.., n, Dh] tensor: forward reads packed, backward writes it."""
    for h in range(n):
        src, dst = packed + h * 2 * HALF, split + h * 2 * HALF
        if BACKWARD:
            src, dst = dst, src
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        if ROTATE:
            x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        tl.store(dst, x1.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, x2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_rope_kernel(qkv_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, T, H, Hkv, s_b, s_t,
                     HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)  # int64 offsets: B * T * heads * Dh may pass 2^31
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask = (t < T)[:, None] & (d < HALF)[None, :]
    row = (b * T + t)[:, None]
    cos = tl.load(cos_ptr + row * HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + row * HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the inverse rotation
        sin = -sin
    packed = qkv_ptr + b * s_b + t[:, None] * s_t + d[None, :]
    _heads(packed, q_ptr + row * H * 2 * HALF + d[None, :], H, cos, sin, mask, HALF, True, BACKWARD)
    packed += H * 2 * HALF
    _heads(packed, k_ptr + row * Hkv * 2 * HALF + d[None, :], Hkv, cos, sin, mask, HALF, True, BACKWARD)
    packed += Hkv * 2 * HALF
    _heads(packed, v_ptr + row * Hkv * 2 * HALF + d[None, :], Hkv, cos, sin, mask, HALF, False, BACKWARD)


BLOCK_T = 16


def _launch(qkv, q, k, v, cos, sin, backward: bool):
    batch, T, H, Dh = q.shape
    _qkv_rope_kernel[(triton.cdiv(T, BLOCK_T), batch)](
        qkv, q, k, v, cos, sin, T, H, k.shape[2], qkv.stride(0), qkv.stride(1), HALF=Dh // 2, BLOCK_T=BLOCK_T,
        BLOCK_D=triton.next_power_of_2(Dh // 2), BACKWARD=backward, num_warps=4)


def rope_forward(qkv, cos, sin, n_heads: int, n_kv_heads: int):
    batch, T, width = qkv.shape
    Dh = width // (n_heads + 2 * n_kv_heads)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q = qkv.new_empty(batch, T, n_heads, Dh)
    k, v = (qkv.new_empty(batch, T, n_kv_heads, Dh) for _ in range(2))
    _launch(qkv, q, k, v, cos, sin, backward=False)
    return q, k, v


def rope_backward(dq, dk, dv, cos, sin):
    batch, T, H, Dh = dq.shape
    dqkv = dq.new_empty(batch, T, (H + 2 * dk.shape[2]) * Dh)
    _launch(dqkv, dq.contiguous(), dk.contiguous(), dv.contiguous(), cos, sin, backward=True)
    return dqkv


@torch.library.custom_op("samba_lm::qkv_rope_fwd", mutates_args=())
def _rope_fwd_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
                 n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rope_forward(qkv, cos, sin, n_heads, n_kv_heads)


@_rope_fwd_op.register_fake
def _(qkv, cos, sin, n_heads, n_kv_heads):
    batch, T, width = qkv.shape
    Dh = width // (n_heads + 2 * n_kv_heads)
    return (qkv.new_empty(batch, T, n_heads, Dh), qkv.new_empty(batch, T, n_kv_heads, Dh),
            qkv.new_empty(batch, T, n_kv_heads, Dh))


@torch.library.custom_op("samba_lm::qkv_rope_bwd", mutates_args=())
def _rope_bwd_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
    return rope_backward(dq, dk, dv, cos, sin)


@_rope_bwd_op.register_fake
def _(dq, dk, dv, cos, sin):
    batch, T, H, Dh = dq.shape
    return dq.new_empty(batch, T, (H + 2 * dk.shape[2]) * Dh)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _backward(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    return _rope_bwd_op(dq, dk, dv, cos, sin), None, None, None, None


torch.library.register_autograd("samba_lm::qkv_rope_fwd", _backward, setup_context=_setup)


def qkv_rope_triton(qkv, positions, n_heads, n_kv_heads, base):
    # Contiguous positions give contiguous [B, T, Dh/2] angles, the layout the kernel indexes.
    head_dim = qkv.shape[-1] // (n_heads + 2 * n_kv_heads)
    cos, sin = rope_cos_sin(positions.contiguous(), head_dim, base, torch.float32)
    return _rope_fwd_op(qkv, cos, sin, n_heads, n_kv_heads)
