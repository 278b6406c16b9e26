"""RoPE on the fused QKV projection in Triton (the QKV epilogue): forward and backward, one kernel each.

Layout (as `rope.py`): qkv [B, T, (H + 2*Hkv) * Dh] with the last dim contiguous (batch and time may
be strided: a view is read in place); q [B, T, H, Dh], k and v [B, T, Hkv, Dh] come out contiguous in
qkv's dtype. One program per (BLOCK_T steps, batch row, group of heads) rotates heads of q or k in
fp32, or copies heads of v: a decode step spreads its 40-odd heads over as many programs (one program
walking them all took 11 us at samba-1.7b, batch 1, on an H200), longer inputs take 8 heads a program
and make the angles once for all 8. The angles are computed in the kernel, in float64 as the reference does (position x inverse frequency, the frequencies made once per head dim
and base by the reference's `rope_inv_freq`), their cosines and sines rounded to fp32: eight fewer
launches per attention layer than computing them in torch.

v is a copy, not a view of qkv: a custom op's outputs may not alias its inputs, and with v copied
nothing downstream keeps the whole qkv projection alive for the backward (attention saves q, k, v).
Backward: the rotation is orthogonal, so dq and dk turn back by the negative angles; the same kernel
writes them and dv into one dqkv buffer. Nothing is saved but the positions.
What the reference covers that this does not: float64, CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import tuning
from .rope import rope_inv_freq


@triton.jit
def _qkv_rope_kernel(qkv_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, freq_ptr, T, H, Hkv, s_b, s_t,
                     HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HEADS: tl.constexpr,
                     BACKWARD: tl.constexpr):
    """Program (time block, batch row, group of HEADS heads): those heads of q, k or v between the
    packed qkv and their split tensors (forward reads packed; backward writes it). The angles are made
    once per program, for all of its heads."""
    b = tl.program_id(1).to(tl.int64)  # int64 offsets: B * T * heads * Dh may pass 2^31
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask = (t < T)[:, None] & (d < HALF)[None, :]
    row = (b * T + t)[:, None]
    position = tl.load(pos_ptr + b * T + t, mask=t < T, other=0).to(tl.float64)
    angle = position[:, None] * tl.load(freq_ptr + d, mask=d < HALF, other=0.0)[None, :]  # float64
    cos = tl.cos(angle).to(tl.float32)
    sin = tl.sin(angle).to(tl.float32)
    if BACKWARD:  # the inverse rotation
        sin = -sin
    for i in tl.static_range(HEADS):
        head = tl.program_id(2) * HEADS + i
        if head < H + 2 * Hkv:
            packed = qkv_ptr + b * s_b + t[:, None] * s_t + head * 2 * HALF + d[None, :]
            if head < H:
                split = q_ptr + (row * H + head) * 2 * HALF + d[None, :]
            elif head < H + Hkv:
                split = k_ptr + (row * Hkv + head - H) * 2 * HALF + d[None, :]
            else:
                split = v_ptr + (row * Hkv + head - H - Hkv) * 2 * HALF + d[None, :]
            src, dst = (split, packed) if BACKWARD else (packed, split)
            x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
            if head < H + Hkv:  # q and k turn; v is copied
                x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
            tl.store(dst, x1.to(dst.dtype.element_ty), mask=mask)
            tl.store(dst + HALF, x2.to(dst.dtype.element_ty), mask=mask)


@tuning.register("rope")
@dataclass(frozen=True)
class RopeTuning(tuning.Tuning):
    """The rope kernel's tile (`tuning.tuned(rope=...)`)."""

    block_t: int = 16
    """Steps per program, forward and backward (a decode step: one)."""
    heads_per_program: int = 8
    """Heads per program over more than one step; a decode step: one, spreading its heads over as
    many programs. The float64 angles are made once per program, so more heads make fewer of them."""
    warps: int = 8
    """Warps per program over more than one step (a decode step: one). H200, B8 T4096, forward /
    backward kernel ms over 18 settings (block_t 16/32/64, heads 2/4/8, warps 4/8): samba-421m's
    36 heads of 128, 0.226 / 0.226 with 8 warps against 0.326 / 0.325 with 4 (a copy of qkv: 0.144);
    samba-1.7b's 40 of 64, 0.134 / 0.132 against 0.139 / 0.137 (copy 0.084). Smaller blocks of steps
    and more heads a program did best at both."""


def _launch(qkv, q, k, v, positions, inv_freq, backward: bool):
    batch, T, H, Dh = q.shape
    Hkv = k.shape[2]
    tile = tuning.current("rope")
    block_t = min(tile.block_t, triton.next_power_of_2(T))  # a decode step: one row per program
    heads = 1 if T == 1 else tile.heads_per_program
    _qkv_rope_kernel[(triton.cdiv(T, block_t), batch, triton.cdiv(H + 2 * Hkv, heads))](
        qkv, q, k, v, positions, inv_freq, T, H, Hkv, qkv.stride(0), qkv.stride(1), HALF=Dh // 2,
        BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(Dh // 2), HEADS=heads, BACKWARD=backward,
        num_warps=1 if T == 1 else tile.warps)


def _head_dim(width: int, n_heads: int, n_kv_heads: int) -> int:
    return width // (n_heads + 2 * n_kv_heads)


def rope_forward(qkv, positions, inv_freq, n_heads: int, n_kv_heads: int):
    batch, T, width = qkv.shape
    Dh = _head_dim(width, n_heads, n_kv_heads)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q = qkv.new_empty(batch, T, n_heads, Dh)
    k, v = (qkv.new_empty(batch, T, n_kv_heads, Dh) for _ in range(2))
    _launch(qkv, q, k, v, positions, inv_freq, backward=False)
    return q, k, v


def rope_backward(dq, dk, dv, positions, inv_freq):
    batch, T, H, Dh = dq.shape
    dqkv = dq.new_empty(batch, T, (H + 2 * dk.shape[2]) * Dh)
    _launch(dqkv, dq.contiguous(), dk.contiguous(), dv.contiguous(), positions, inv_freq, backward=True)
    return dqkv


@torch.library.custom_op("samba_lm::qkv_rope_fwd", mutates_args=())
def _rope_fwd_op(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, n_heads: int,
                 n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rope_forward(qkv, positions, inv_freq, n_heads, n_kv_heads)


@_rope_fwd_op.register_fake
def _(qkv, positions, inv_freq, n_heads, n_kv_heads):
    batch, T, width = qkv.shape
    Dh = _head_dim(width, n_heads, n_kv_heads)
    return (qkv.new_empty(batch, T, n_heads, Dh), qkv.new_empty(batch, T, n_kv_heads, Dh),
            qkv.new_empty(batch, T, n_kv_heads, Dh))


@torch.library.custom_op("samba_lm::qkv_rope_bwd", mutates_args=())
def _rope_bwd_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, positions: torch.Tensor,
                 inv_freq: torch.Tensor) -> torch.Tensor:
    return rope_backward(dq, dk, dv, positions, inv_freq)


@_rope_bwd_op.register_fake
def _(dq, dk, dv, positions, inv_freq):
    batch, T, H, Dh = dq.shape
    return dq.new_empty(batch, T, (H + 2 * dk.shape[2]) * Dh)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.tuning = tuning.current("rope")


def _backward(ctx, dq, dk, dv):
    positions, inv_freq = ctx.saved_tensors
    with tuning.tuned(rope=ctx.tuning):  # the forward's: autograd's CUDA thread sees the defaults
        return _rope_bwd_op(dq, dk, dv, positions, inv_freq), None, None, None, None


torch.library.register_autograd("samba_lm::qkv_rope_fwd", _backward, setup_context=_setup)


def qkv_rope_triton(qkv, positions, n_heads, n_kv_heads, base):
    # Contiguous positions: the kernel indexes them as [B, T].
    inv_freq = rope_inv_freq(_head_dim(qkv.shape[-1], n_heads, n_kv_heads), base, qkv.device)
    return _rope_fwd_op(qkv, positions.contiguous(), inv_freq, n_heads, n_kv_heads)
