"""The Mamba mixer's decode step in Triton: two fused kernels between the projections, the states
updated in place.

Layout (as `mamba.py`, T = 1): xz [B, 1, 2E] with the channel dim contiguous; conv_state [B, E, K-1]
and ssm_state [B, E, N] contiguous, ssm_state fp32. A one-token call without gradients runs

    _conv_step_kernel   x (zeroed at a negative position) -> conv with the state (shifted in place)
                        -> silu -> x' (zeroed again)                                   [B, E]
                        and x_proj's partial sums over the program's channels     [E / C, B, R + 2N]
    _scan_step_kernel   (dt, B, C) = the partials summed; delta = softplus(dt_proj_weight @ dt +
                        dt_proj_bias); A = -exp(A_log); h <- exp(delta A) h + delta x' B (in place);
                        y = (C.h + D x') silu(z)

instead of the reference's dozen launches (chunk views, masks, the conv, two projections, the
exponential of A_log, casts, the scan, the state copies). x_proj (d_inner -> R + 2N, 160 outputs at
samba-1.7b) is a long reduction over channels with few outputs: as a matmul it ran 10.6 us on an H200
(batch 1, 1.3 MB of weights) for want of parallel work; as partials of the conv's channel blocks it
rides along. dt_proj is a per-channel dot product (R terms), so it fuses into the scan step without
any reduction across programs. One program per (channel block, row): a loop over rows inside a
program, to reuse its weight tiles, serialised their loads (H200: the scan step at batch 64 went from
22 to 76 us), and 16-row tl.dot tiles ran the conv step at 30 us at batch 1, against 4. Chunks (T > 1) take the reference's composition of the conv and scan ops, and so do gradients, but for
calls from fresh streams (training), which `triton_mamba_train.py` runs. What
the reference covers that this does not: float64, CPUs (except under TRITON_INTERPRET=1), T > 1.

A row whose document starts at this token (reset, HAS_RESET) takes its conv and ssm states as zeros,
so it steps as a fresh stream; the shifted conv state then holds zeros before the new input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import triton
import triton.language as tl

from . import tuning
from .mamba import mamba_inner_reference
from .triton_mamba_train import mamba_inner_train
from .triton_scan import resets


@triton.jit
def _conv_step_kernel(xz_ptr, pos_ptr, r_ptr, w_ptr, bias_ptr, s_ptr, wx_ptr, x_ptr, part_ptr, B, E, RN, s_xzb,
                      K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_RESET: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_O: tl.constexpr, O_CHUNK: tl.constexpr):
    """Program (channel block, row): the conv step of its channels, then their share of x_proj, a
    partial sum over these channels of x_proj_weight[:, e] x'[e] (the scan step adds the partials)."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    b = tl.program_id(1)
    em = e < E
    x = tl.load(xz_ptr + b * s_xzb + e, mask=em, other=0.0)
    if HAS_POS:  # left padding enters neither the conv state nor the scan
        real = tl.load(pos_ptr + b) >= 0
        x = tl.where(real, x, 0.0)
    acc = tl.load(w_ptr + e * K + (K - 1), mask=em, other=0.0).to(tl.float32) * x.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32)
    row = s_ptr + (b * E + e) * (K - 1)
    if HAS_RESET:  # a new document: the inputs before it read as zeros, and shift in as zeros
        fresh = tl.load(r_ptr + b) != 0
    for k in tl.static_range(K - 1):  # the state holds the last K-1 inputs: shift it left, append x
        v = tl.load(row + k, mask=em, other=0.0)
        if HAS_RESET:
            v = tl.where(fresh, 0.0, v)
        acc += tl.load(w_ptr + e * K + k, mask=em, other=0.0).to(tl.float32) * v.to(tl.float32)
        if k > 0:
            tl.store(row + k - 1, v, mask=em)
    tl.store(row + K - 2, x.to(s_ptr.dtype.element_ty), mask=em)
    y = acc * tl.sigmoid(acc)
    if HAS_POS:
        y = tl.where(real, y, 0.0)
    y = y.to(x_ptr.dtype.element_ty)  # rounded as the reference's conv output, before x_proj reads it
    tl.store(x_ptr + b * E + e, y, mask=em)
    y = y.to(tl.float32)
    for o0 in tl.static_range(0, BLOCK_O, O_CHUNK):  # a [O_CHUNK, BLOCK_E] weight tile at a time: no spills
        o = o0 + tl.arange(0, O_CHUNK)
        om = o < RN
        wx = tl.load(wx_ptr + o[:, None] * E + e[None, :], mask=om[:, None] & em[None, :], other=0.0)
        part = tl.sum(wx.to(tl.float32) * y[None, :], axis=1)
        tl.store(part_ptr + (tl.program_id(0) * B + b) * RN + o, part, mask=om)


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))  # torch's threshold: linear above 20


@triton.jit
def _scan_step_kernel(xz_ptr, x_ptr, part_ptr, w_ptr, bias_ptr, alog_ptr, D_ptr, r_ptr, h_ptr, y_ptr,
                      B, E, R, N, RN, n_parts, s_xzb,
                      HAS_D: tl.constexpr, HAS_RESET: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (channel block, row): x_proj's output summed from the partials, dt_proj for these
    channels, the softplus, the state update in place and the gated output."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    b = tl.program_id(1)
    r = tl.arange(0, BLOCK_R)
    n = tl.arange(0, BLOCK_N)
    p = tl.arange(0, BLOCK_P)
    em, rm, nm, pm = e < E, r < R, n < N, p < n_parts
    en = em[:, None] & nm[None, :]
    parts = part_ptr + (p[:, None] * B + b) * RN  # summed in a fixed order: deterministic
    dt_low = tl.sum(tl.load(parts + r[None, :], mask=pm[:, None] & rm[None, :], other=0.0), axis=0)
    Bv = tl.sum(tl.load(parts + R + n[None, :], mask=pm[:, None] & nm[None, :], other=0.0), axis=0)
    Cv = tl.sum(tl.load(parts + R + N + n[None, :], mask=pm[:, None] & nm[None, :], other=0.0), axis=0)
    w = tl.load(w_ptr + e[:, None] * R + r[None, :], mask=em[:, None] & rm[None, :], other=0.0).to(tl.float32)
    delta = tl.sum(w * dt_low[None, :], axis=1) + tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32)
    delta = _softplus(delta)
    A = -tl.exp(tl.load(alog_ptr + e[:, None] * N + n[None, :], mask=en, other=0.0).to(tl.float32))
    u = tl.load(x_ptr + b * E + e, mask=em, other=0.0).to(tl.float32)
    h_offs = h_ptr + (b * E + e[:, None]) * N + n[None, :]
    h = tl.load(h_offs, mask=en, other=0.0)
    if HAS_RESET:  # a new document steps from a zero state
        h = tl.where(tl.load(r_ptr + b) != 0, 0.0, h)
    h = tl.exp(delta[:, None] * A) * h + (delta * u)[:, None] * Bv[None, :]
    tl.store(h_offs, h, mask=en)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + e, mask=em, other=0.0).to(tl.float32) * u
    z = tl.load(xz_ptr + b * s_xzb + E + e, mask=em, other=0.0).to(tl.float32)
    y *= z * tl.sigmoid(z)
    tl.store(y_ptr + b * E + e, y.to(y_ptr.dtype.element_ty), mask=em)


@tuning.register("mamba_step")
@dataclass(frozen=True)
class MambaStepTuning(tuning.Tuning):
    """The decode step's tile (`tuning.tuned(mamba_step=...)`)."""

    tile: tuple[int, int, int, int, int] = (256, 32, 2, 32, 1)
    """(conv channels per program, x_proj outputs per weight tile, conv warps, scan channels per
    program, scan warps). A conv program of C channels leaves E / C partials of x_proj per row, which
    every scan program sums. One tile at every batch size: the partials' grouping and each reduction's
    order, so a row's bits, do not depend on the rows beside it. `benchmarks/bench_mamba_step.py`,
    H200, 2026-12-01: conv + scan 18.4 / 34.5 us at batch 16 / 64, the best there (the previous (256,
    32, 4, 64, 4): 23.5 / 47.6); at batch 1 the best tile of its own, (64, 32, 4, 16, 4), took 13.4 us
    against the previous 19.4."""
    shape_tiles: Mapping[tuple[int, int], tuple[int, int, int, int, int]] = tuning.table({
        (5120, 192): (256, 32, 2, 64, 2),
    })
    """Tiles of their own by (d_inner, x_proj outputs = dt_rank + 2 d_state), the others take `tile`.
    phi4-mini-flash (5120, 160 + 32), H200, 2026-12-02, the whole decode step after a 4K prompt (seven
    tiles, `benchmarks/sweep_sambay_decode.py --mamba-tiles`): 3.968 / 3.982 ms at batch 16 and 3.10 at
    batch 1 against `tile`'s 4.013 / 4.038 and 3.13; its scan reads 20 partials of 192 per program."""


def _step_tile(E: int, x_proj_outputs: int) -> tuple[int, int, int, int, int]:
    t = tuning.current("mamba_step")
    # int(): weight shapes, symbolic only when a fake implementation traces with dynamic shapes
    return t.shape_tiles.get((int(E), int(x_proj_outputs)), t.tile)


@torch.library.custom_op("samba_lm::mamba_conv_step", mutates_args=("conv_state",))
def _conv_step_op(xz: torch.Tensor, positions: torch.Tensor | None, conv_weight: torch.Tensor,
                  conv_bias: torch.Tensor | None, conv_state: torch.Tensor, x_proj_weight: torch.Tensor,
                  reset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return conv_step(xz, positions, conv_weight, conv_bias, conv_state, x_proj_weight, reset)


def conv_step(xz, positions, conv_weight, conv_bias, conv_state, x_proj_weight, reset=None, tile=None):
    batch = xz.shape[0]
    E, K = conv_weight.shape
    block_e, o_chunk, warps = (tile or _step_tile(E, x_proj_weight.shape[0]))[:3]
    x, part = _conv_step_outputs(xz, conv_weight, x_proj_weight, block_e)
    _conv_step_kernel[(part.shape[0], batch)](
        xz, positions if positions is not None else conv_state, resets(reset, conv_state), conv_weight.contiguous(),
        conv_bias if conv_bias is not None else conv_weight, conv_state, x_proj_weight.contiguous(), x, part,
        batch, E, x_proj_weight.shape[0], xz.stride(0), K=K, HAS_BIAS=conv_bias is not None,
        HAS_POS=positions is not None, HAS_RESET=reset is not None, BLOCK_E=block_e,
        BLOCK_O=triton.cdiv(x_proj_weight.shape[0], o_chunk) * o_chunk, O_CHUNK=o_chunk, num_warps=warps)
    return x, part


def _conv_step_outputs(xz, conv_weight, x_proj_weight, block_e):
    """x' [B, 1, E] in xz's dtype, and x_proj's partial sums [channel blocks, B, R + 2N] in fp32."""
    E = conv_weight.shape[0]
    return (xz.new_empty(xz.shape[0], 1, E),
            xz.new_empty(triton.cdiv(E, block_e), xz.shape[0], x_proj_weight.shape[0], dtype=torch.float32))


@_conv_step_op.register_fake
def _(xz, positions, conv_weight, conv_bias, conv_state, x_proj_weight, reset):
    block_e = _step_tile(conv_weight.shape[0], x_proj_weight.shape[0])[0]
    return _conv_step_outputs(xz, conv_weight, x_proj_weight, block_e)


@torch.library.custom_op("samba_lm::mamba_scan_step", mutates_args=("ssm_state",))
def _scan_step_op(xz: torch.Tensor, x: torch.Tensor, part: torch.Tensor, dt_proj_weight: torch.Tensor,
                  dt_proj_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor | None,
                  ssm_state: torch.Tensor, reset: torch.Tensor | None) -> torch.Tensor:
    return scan_step(xz, x, part, dt_proj_weight, dt_proj_bias, A_log, D, ssm_state, reset)


def scan_step(xz, x, part, dt_proj_weight, dt_proj_bias, A_log, D, ssm_state, reset=None, tile=None):
    batch = xz.shape[0]
    E, N = A_log.shape
    R = dt_proj_weight.shape[1]
    block_e, warps = (tile or _step_tile(E, R + 2 * N))[3:]
    y = x.new_empty(batch, 1, E)
    _scan_step_kernel[(triton.cdiv(E, block_e), batch)](
        xz, x, part, dt_proj_weight.contiguous(), dt_proj_bias, A_log.contiguous(), D if D is not None else dt_proj_bias,
        resets(reset, ssm_state), ssm_state, y, batch, E, R, N, part.shape[2], part.shape[0], xz.stride(0),
        HAS_D=D is not None, HAS_RESET=reset is not None, BLOCK_E=block_e, BLOCK_R=triton.next_power_of_2(R),
        BLOCK_N=triton.next_power_of_2(N), BLOCK_P=triton.next_power_of_2(part.shape[0]), num_warps=warps)
    return y


@_scan_step_op.register_fake
def _(xz, x, part, dt_proj_weight, dt_proj_bias, A_log, D, ssm_state, reset):
    return x.new_empty(xz.shape[0], 1, A_log.shape[0])


def _decodes(xz, positions, conv_state, ssm_state, needs_grad) -> bool:
    """A one-token call without gradients, with states the kernels can update in place."""
    return (xz.shape[1] == 1 and not needs_grad and conv_state is not None and ssm_state is not None
            and ssm_state.dtype == torch.float32 and conv_state.is_contiguous() and ssm_state.is_contiguous()
            and xz.stride(-1) == 1 and (positions is None or positions.is_contiguous()))


def mamba_inner_triton(xz, positions, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
                       conv_state=None, ssm_state=None, reset=None):
    params = (xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, conv_state, ssm_state)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    if needs_grad and positions is None and conv_state is None and ssm_state is None and xz.shape[1] > 0:
        return mamba_inner_train(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
                                 reset)
    if not _decodes(xz, positions, conv_state, ssm_state, needs_grad):
        return mamba_inner_reference(xz, positions, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                                     dt_proj_bias, A_log, D, conv_state, ssm_state, reset)
    x, part = _conv_step_op(xz, positions, conv_weight, conv_bias, conv_state, x_proj_weight, reset)
    y = _scan_step_op(xz, x, part, dt_proj_weight, dt_proj_bias, A_log, D, ssm_state, reset)
    return y, conv_state, ssm_state
