"""Causal depthwise conv1d + bias + SiLU in Triton, forward and backward, with the carried state.

Layout (as `conv.py`): x [B, T, E] with channels contiguous, weight [E, K], bias [E], initial_state
[B, E, K-1] (the K-1 inputs before x). One program per (batch row, BLOCK_T steps, BLOCK_E channels):
tiles are [BLOCK_T, BLOCK_E] with coalesced channel reads; the K taps are unrolled.

Backward, one kernel (`ConvTuning.fused_backward`): a program walks a range of time steps of one row
and BLOCK_E channels a step at a time, BLOCK_T rows loaded ahead. It keeps a window of the last K-1
inputs and of their gradients so far in registers: step t recomputes the pre-activation (K FMAs) and
dpre_t, adds w_k dpre_t to the gradient of input t-K+1+k (the transposed conv, scattered), and the
oldest input, now complete, leaves the window as dx (or d initial_state, for the state's slots). The
walk starts 2(K-1) steps before its first output (the outputs before it that read its first inputs,
and their inputs): no dpre goes to memory and no thread reads another's. d weight and d bias
accumulate elementwise in float32 registers, one partial per (row, program along time), added up
afterwards in a fixed order (deterministic).

Backward, two passes (`fused_backward=False`): per output tile, the pre-activation again (K cached
loads) and its gradient dpre, kept in float32 [B, T, E] (a transient 4 bytes per element), with partial
sums of d weight and d bias per (row, time block); then per input tile s (from -(K-1), the state's
slots, to T-1), dx_s = sum_j w_j dpre_{s+K-1-j} (or d initial_state for s < 0).

What the reference covers that this does not: float64, CPUs.

Document resets (reset [B, T] bool, HAS_RESET): a tap of output t reads input s only from s >= the
first input t may see (`_first_seen`: its document's start within the window), and dx of input s takes
outputs only up to the last one that sees it (`_last_seen`: the one before the next document start);
both look at the K-1 flags beside each time step. The fused backward needs one flag a step instead: a
document start zeroes the window's inputs and stops its gradients taking more. The final state's slots
before the last reset are zeroed by the launcher, and so is their gradient. Without resets the kernels
are today's: no flag loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import tuning
from .conv import slots_before_last_reset


@triton.jit
def _starts(r_ptr, b, r, T):
    """Whether a document starts at time r (a [BLOCK_T] vector; False outside [0, T))."""
    return tl.load(r_ptr + b * T + r, mask=(r >= 0) & (r < T), other=0) != 0


@triton.jit
def _first_seen(r_ptr, b, t, T, K: tl.constexpr, HAS_RESET: tl.constexpr):
    """Per output t, the first input it reads: t-K+1, or the last document start in (t-K+1, t]."""
    first = t - (K - 1)
    if HAS_RESET:
        for i in tl.static_range(1, K):  # ascending: the last start wins
            first = tl.where(_starts(r_ptr, b, t - (K - 1) + i, T), t - (K - 1) + i, first)
    return first


@triton.jit
def _last_seen(r_ptr, b, s, T, K: tl.constexpr, HAS_RESET: tl.constexpr):
    """Per input s, the last output that reads it: s+K-1, or the one before the first document start
    in (s, s+K-1]."""
    last = s + (K - 1)
    if HAS_RESET:
        for i in tl.static_range(K - 1):  # descending: the first start wins
            last = tl.where(_starts(r_ptr, b, s + (K - 1) - i, T), s + (K - 2) - i, last)
    return last


@triton.jit
def _load_xcat(x_ptr, s_ptr, b, src, first, e, tm, em, T, E, s_xb, s_xt,
               K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr):
    """Input at time src (a [BLOCK_T] vector, may be negative: then from the state), [BLOCK_T, BLOCK_E];
    with resets, zero before `first` (the inputs of an earlier document)."""
    if HAS_RESET:
        tm = tm & (src >= first)
    inside = (src >= 0) & (src < T) & tm
    v = tl.load(x_ptr + b * s_xb + src[:, None] * s_xt + e[None, :], mask=inside[:, None] & em[None, :], other=0.0)
    v = v.to(tl.float32)
    if HAS_STATE:
        before = (src < 0) & (src >= -(K - 1)) & tm
        slot = tl.where(before, src + K - 1, 0)
        v += tl.load(s_ptr + (b * E + e[None, :]) * (K - 1) + slot[:, None], mask=before[:, None] & em[None, :],
                     other=0.0).to(tl.float32)
    return v


@triton.jit
def _pre_activation(x_ptr, s_ptr, w_ptr, bias_ptr, b, t, first, e, tm, em, T, E, s_xb, s_xt,
                    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr):
    acc = tl.zeros([t.shape[0], e.shape[0]], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        w = tl.load(w_ptr + e * K + k, mask=em, other=0.0).to(tl.float32)
        acc += w[None, :] * _load_xcat(x_ptr, s_ptr, b, t - (K - 1) + k, first, e, tm, em, T, E, s_xb, s_xt,
                                       K, HAS_STATE, HAS_RESET)
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, s_ptr, r_ptr, y_ptr, T, E, s_xb, s_xt,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(2)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    tm, em = t < T, e < E
    first = _first_seen(r_ptr, b, t, T, K, HAS_RESET)
    pre = _pre_activation(x_ptr, s_ptr, w_ptr, bias_ptr, b, t, first, e, tm, em, T, E, s_xb, s_xt,
                          K, HAS_BIAS, HAS_STATE, HAS_RESET)
    y = pre * tl.sigmoid(pre)
    tl.store(y_ptr + (b * T + t[:, None]) * E + e[None, :], y.to(y_ptr.dtype.element_ty), mask=tm[:, None] & em[None, :])


@triton.jit
def _conv_bwd_dpre_kernel(x_ptr, w_ptr, bias_ptr, s_ptr, r_ptr, dy_ptr, dpre_ptr, dw_ptr, db_ptr, T, E,
                          s_xb, s_xt, s_yb, s_yt, K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
                          HAS_RESET: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per output tile: d pre-activation (float32, for the dx kernel) and this tile's d weight, d bias."""
    b = tl.program_id(2)
    pid_t = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    tm, em = t < T, e < E
    mask = tm[:, None] & em[None, :]
    first = _first_seen(r_ptr, b, t, T, K, HAS_RESET)
    pre = _pre_activation(x_ptr, s_ptr, w_ptr, bias_ptr, b, t, first, e, tm, em, T, E, s_xb, s_xt,
                          K, HAS_BIAS, HAS_STATE, HAS_RESET)
    dy = tl.load(dy_ptr + b * s_yb + t[:, None] * s_yt + e[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(pre)
    dpre = tl.where(mask, dy * sig * (1.0 + pre * (1.0 - sig)), 0.0)
    tl.store(dpre_ptr + (b * T + t[:, None]) * E + e[None, :], dpre, mask=mask)
    part = (b * tl.num_programs(1) + pid_t) * E + e
    if HAS_BIAS:
        tl.store(db_ptr + part, tl.sum(dpre, axis=0), mask=em)
    for k in tl.static_range(K):  # the same inputs as the forward's taps: cache hits
        xk = _load_xcat(x_ptr, s_ptr, b, t - (K - 1) + k, first, e, tm, em, T, E, s_xb, s_xt, K, HAS_STATE, HAS_RESET)
        tl.store(dw_ptr + part * K + k, tl.sum(dpre * xk, axis=0), mask=em)


@triton.jit
def _conv_bwd_dx_kernel(w_ptr, r_ptr, dpre_ptr, dfinal_ptr, dx_ptr, ds_ptr, T, E,
                        K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_RESET: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per input tile, from -(K-1) (the state's slots) to T-1: dx_s = sum_j w_j dpre_{s+K-1-j}."""
    b = tl.program_id(2)
    s = tl.program_id(1) * BLOCK_T - (K - 1) + tl.arange(0, BLOCK_T)
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    em = e < E
    sm = s < T
    last_reader = _last_seen(r_ptr, b, s, T, K, HAS_RESET)
    dxcat = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for j in tl.static_range(K):
        t = s + (K - 1) - j  # the output that sees input s through tap j
        tm = (t >= 0) & (t < T) & sm
        if HAS_RESET:
            tm = tm & (t <= last_reader)
        w = tl.load(w_ptr + e * K + j, mask=em, other=0.0).to(tl.float32)
        dxcat += w[None, :] * tl.load(dpre_ptr + (b * T + t[:, None]) * E + e[None, :], mask=tm[:, None] & em[None, :],
                                      other=0.0)
    # The final state is the last K-1 inputs: its gradient lands on them directly (the launcher has
    # zeroed it on the slots that resets cut off).
    if HAS_DFINAL:
        last = (s >= T - (K - 1)) & sm
        slot = tl.where(last, s - (T - (K - 1)), 0)
        dxcat += tl.load(dfinal_ptr + (b * E + e[None, :]) * (K - 1) + slot[:, None], mask=last[:, None] & em[None, :],
                         other=0.0).to(tl.float32)
    in_x = (s >= 0) & sm
    tl.store(dx_ptr + (b * T + s[:, None]) * E + e[None, :], dxcat.to(dx_ptr.dtype.element_ty),
             mask=in_x[:, None] & em[None, :])
    if HAS_STATE:
        in_state = s < 0
        slot = tl.where(in_state, s + K - 1, 0)
        tl.store(ds_ptr + (b * E + e[None, :]) * (K - 1) + slot[:, None], dxcat.to(ds_ptr.dtype.element_ty),
                 mask=in_state[:, None] & em[None, :])


@triton.jit
def _rows(x_row, s_row, r_row, dy_row, base, zi, em, T, s_xt, s_yt, K: tl.constexpr, HAS_STATE: tl.constexpr,
          HAS_RESET: tl.constexpr, BLOCK_T: tl.constexpr):
    """Steps base .. base+BLOCK_T-1 of one row (the pointers at its step 0), tuples of [BLOCK_E] float32:
    the inputs (from the state before 0, zeros outside [-(K-1), T)), dy (zeros outside [0, T)) and,
    with resets, 0 where a document starts (else 1). One call a block: the interpreter's are slow."""
    xs, dys, keeps = (), (), ()
    for r in tl.static_range(BLOCK_T):
        t = base + r
        tv = t + zi  # the interpreter rejects scalar & vector masks
        inside = em & (tv >= 0) & (tv < T)
        x = tl.load(x_row + t * s_xt, mask=inside, other=0.0).to(tl.float32)
        if HAS_STATE:
            x += tl.load(s_row + t, mask=em & (tv < 0) & (tv >= -(K - 1)), other=0.0).to(tl.float32)
        xs = xs + (x,)
        dys = dys + (tl.load(dy_row + t * s_yt, mask=inside, other=0.0).to(tl.float32),)
        if HAS_RESET:
            keeps = keeps + (1.0 - (tl.load(r_row + t, mask=(t >= 0) & (t < T), other=0) != 0).to(tl.float32),)
    return xs, dys, keeps


@triton.jit
def _conv_bwd_fused_kernel(x_ptr, w_ptr, bias_ptr, s_ptr, r_ptr, dy_ptr, dfinal_ptr, dx_ptr, ds_ptr, dw_ptr, db_ptr,
                           T, E, s_xb, s_xt, s_yb, s_yt, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                           HAS_STATE: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_RESET: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, TILES: tl.constexpr):
    """Outputs t0 .. t1-1 (TILES blocks of BLOCK_T steps; the last program's reach T+K-2, where dpre is 0,
    to complete the last inputs) of one row and channel block, a step at a time, and the gradients of
    inputs t0-(K-1) .. t1-K. The walk starts 2(K-1) steps early: the outputs before t0 that read this
    program's first inputs, and the inputs those outputs read."""
    b, pid_t = tl.program_id(2), tl.program_id(1)
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    em, zi = e < E, tl.zeros_like(e)
    t0 = pid_t * (TILES * BLOCK_T)
    t1 = tl.minimum(t0 + TILES * BLOCK_T, T + K - 1)
    lo, hi = t0 - (K - 1), t1 - (K - 1)  # this program's inputs
    # The row's pointers at step 0 (the state's and the final state's at their slots for input 0).
    x_row, dy_row, dx_row = x_ptr + b * s_xb + e, dy_ptr + b * s_yb + e, dx_ptr + b * T * E + e
    s_row = s_ptr + (b * E + e) * (K - 1) + K - 1
    ds_row, df_row = ds_ptr + (b * E + e) * (K - 1) + K - 1, dfinal_ptr + (b * E + e) * (K - 1) - (T - (K - 1))
    zero = tl.zeros([BLOCK_E], dtype=tl.float32)
    one = tl.full((), 1.0, tl.float32)
    bias = tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32) if HAS_BIAS else zero
    w, dw = (), ()
    for k in tl.static_range(K):
        w, dw = w + (tl.load(w_ptr + e * K + k, mask=em, other=0.0).to(tl.float32),), dw + (zero,)
    db = zero
    # The window before step t: inputs t-K+1 .. t-1, their gradients so far, and (with resets) whether
    # output t still sees them (0 once a document starts after them; their values are zeroed then).
    xwin, gwin, seen = (), (), ()
    for k in tl.static_range(K - 1):
        xwin, gwin, seen = xwin + (zero,), gwin + (zero,), seen + (one,)
    for base in range(t0 - 2 * (K - 1), t1, BLOCK_T):
        # The block's loads first: BLOCK_T rows in flight.
        xs, dys, keeps = _rows(x_row, s_row, r_ptr + b * T, dy_row, base, zi, em, T, s_xt, s_yt,
                               K, HAS_STATE, HAS_RESET, BLOCK_T)
        for r in tl.static_range(BLOCK_T):
            t = base + r
            if HAS_RESET:  # a document starting at t sees none of the inputs before it
                x_kept, seen_kept = (), ()
                for k in tl.static_range(K - 1):
                    x_kept, seen_kept = x_kept + (xwin[k] * keeps[r],), seen_kept + (seen[k] * keeps[r],)
                xwin, seen = x_kept, seen_kept
            pre = bias  # in the forward's order: the same dpre as the two passes
            for k in tl.static_range(K - 1):
                pre += w[k] * xwin[k]
            pre += w[K - 1] * xs[r]
            sig = 1.0 / (1.0 + tl.exp(-pre))  # tl.sigmoid, without the interpreter's slow call
            dpre = dys[r] * sig * (1.0 + pre * (1.0 - sig))  # 0 outside [0, T), as dy
            own = dpre * ((t >= t0) & (t < t1)).to(tl.float32)  # outputs outside [t0, t1): other programs'
            db += own
            taps, grads = (), ()
            for k in tl.static_range(K - 1):  # input t-K+1+k takes w_k dpre_t
                taps = taps + (dw[k] + own * xwin[k],)
                grads = grads + (gwin[k] + (w[k] * seen[k] if HAS_RESET else w[k]) * dpre,)
            dw = taps + (dw[K - 1] + own * xs[r],)
            # Input s = t-K+1 is complete: it leaves the window (from -(K-1): the state's slots).
            g, s = grads[0], t - (K - 1)
            sv = s + zi
            mine = em & (sv >= lo) & (sv < hi)
            if HAS_DFINAL:  # the final state is the last K-1 inputs: its gradient lands on them directly
                g += tl.load(df_row + s, mask=mine & (sv >= T - (K - 1)) & (sv < T), other=0.0).to(tl.float32)
            tl.store(dx_row + s * E, g.to(dx_ptr.dtype.element_ty), mask=mine & (sv >= 0) & (sv < T))
            if HAS_STATE:
                tl.store(ds_row + s, g, mask=mine & (sv < 0))
            xwin, gwin, seen = xwin[1:] + (xs[r],), grads[1:] + (w[K - 1] * dpre,), seen[1:] + (one,)
    part = (b * tl.num_programs(1) + pid_t) * E + e
    if HAS_BIAS:
        tl.store(db_ptr + part, db, mask=em)
    for k in tl.static_range(K):
        tl.store(dw_ptr + part * K + k, dw[k], mask=em)


@triton.jit
def _conv_step_kernel(x_ptr, w_ptr, bias_ptr, s_ptr, r_ptr, y_ptr, E, s_xb,
                      K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESET: tl.constexpr, BLOCK_E: tl.constexpr):
    """One time step; the state (last K-1 inputs) shifts left in place and takes the new input. A row
    whose document starts at this step reads its state as zeros, and so shifts zeros in."""
    b = tl.program_id(0)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    em = e < E
    keep = em
    if HAS_RESET:  # the row's flag broadcast over its channels (the interpreter rejects scalar & vector)
        keep = em & (tl.load(r_ptr + b) + tl.zeros_like(e) == 0)
    x = tl.load(x_ptr + b * s_xb + e, mask=em, other=0.0)
    acc = tl.load(w_ptr + e * K + (K - 1), mask=em, other=0.0).to(tl.float32) * x.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32)
    row = s_ptr + (b * E + e) * (K - 1)
    for k in tl.static_range(K - 1):
        v = tl.load(row + k, mask=keep, other=0.0)
        acc += tl.load(w_ptr + e * K + k, mask=em, other=0.0).to(tl.float32) * v.to(tl.float32)
        if k > 0:
            tl.store(row + k - 1, v, mask=em)
    tl.store(row + K - 2, x.to(s_ptr.dtype.element_ty), mask=em)
    tl.store(y_ptr + b * E + e, (acc * tl.sigmoid(acc)).to(y_ptr.dtype.element_ty), mask=em)


@tuning.register("conv")
@dataclass(frozen=True)
class ConvTuning(tuning.Tuning):
    """The training kernels' tiles (`tuning.tuned(conv=...)`), (BLOCK_T, BLOCK_E, warps). H200,
    benchmarks/bench_conv.py at B8 L4096 E4096 bf16. 2026-12-01, 24 tiles each: forward 0.200 ms
    (0.269 with the two-pass backward's tile; floor 0.126), forward+backward with the two-pass
    backward 1.76 ms with its tile the best of them (the next, (64, 128, 4), 1.83). 2026-12-02, the fused
    backward, 45 settings (rows 2/4/8, 128 to 1024 channels, 1 to 4 warps, 128/256/512 steps a
    program): forward+backward 0.74 to 0.80 ms for the best few (two passes 1.70), but repeat runs of
    the shipped ones gave 0.76 to 1.20: this path's CPU overhead (B1 L4096 takes 1.0 ms). The kernels
    alone, in CUDA graphs: forward 0.193 ms, fused backward 0.277 with the shipped tiles ((8, 256, 2)
    0.279, 128 steps a program 0.292, 512 steps 0.373, (4, 256, 1) 0.363), two-pass backward 1.272."""

    fwd_tile: tuple[int, int, int] = (64, 128, 4)
    bwd_tile: tuple[int, int, int] = (64, 64, 4)
    """The two-pass backward's, both kernels."""
    fused_backward: bool = True
    """The one-kernel backward; off: the two passes (tests, the benchmark)."""
    fused_tile: tuple[int, int, int] = (8, 128, 1)
    """The fused backward's (rows loaded ahead, BLOCK_E, warps): 4 channels a thread, its window and
    accumulators in registers."""
    fused_tiles_per_program: int = 32
    """Blocks of BLOCK_T steps that one program of the fused backward walks (here 256 steps, each
    program 2(K-1) more; B8 L4096 E4096 runs 17 programs a row and channel block)."""


def _flags(reset, fallback):
    """reset as the kernels read it ([B, T] bytes, rows contiguous), or a dummy pointer without it."""
    return reset.contiguous().view(torch.uint8) if reset is not None else fallback


def conv_forward(x, weight, bias, initial_state, reset):
    batch, T, E = x.shape
    K = weight.shape[1]
    block_t, block_e, warps = tuning.current("conv").fwd_tile
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(batch, T, E, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(E, block_e), triton.cdiv(T, block_t), batch)  # channels fastest: whole rows at a time
    _conv_fwd_kernel[grid](x, weight.contiguous(), bias if bias is not None else y,
                           initial_state.contiguous() if initial_state is not None else y, _flags(reset, y), y, T, E,
                           x.stride(0), x.stride(1), K=K, HAS_BIAS=bias is not None,
                           HAS_STATE=initial_state is not None, HAS_RESET=reset is not None,
                           BLOCK_T=block_t, BLOCK_E=block_e, num_warps=warps)
    past = initial_state.to(x.dtype) if initial_state is not None else x.new_zeros(batch, E, K - 1)
    final = torch.cat([past, x[:, max(0, T - (K - 1)):].transpose(1, 2)], dim=-1)[..., -(K - 1):].contiguous()
    if reset is not None:  # a chunk continuing the last document must not see the inputs before it
        final = final.masked_fill(slots_before_last_reset(reset, K), 0.0)
    return y, final


def conv_backward(dy, d_final, x, weight, bias, initial_state, reset):
    """dx, d weight, d bias (partials per (row, time block) summed in a fixed order: deterministic) and
    d initial_state, by the fused kernel or the two passes (`ConvTuning.fused_backward`)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    if d_final is not None and reset is not None:  # the final state's zeroed slots pass no gradient back
        d_final = d_final.masked_fill(slots_before_last_reset(reset, K=weight.shape[1]), 0.0)
    args = (dy, d_final.contiguous() if d_final is not None else None, x, weight.contiguous(), bias,
            initial_state.contiguous() if initial_state is not None else None, reset)
    t = tuning.current("conv")
    return _backward_fused(t, *args) if t.fused_backward else _backward_two_pass(t, *args)


def _backward_fused(t, dy, d_final, x, weight, bias, initial_state, reset):
    batch, T, E = x.shape
    K = weight.shape[1]
    block_t, block_e, warps = t.fused_tile
    steps = block_t * t.fused_tiles_per_program
    n_e, n_p = triton.cdiv(E, block_e), triton.cdiv(T + K - 1, steps)  # outputs to T+K-2 complete the inputs
    f32 = dict(device=x.device, dtype=torch.float32)
    dx, ds = torch.empty(batch, T, E, device=x.device, dtype=x.dtype), torch.empty(batch, E, K - 1, **f32)
    dw, db = torch.empty(batch, n_p, E, K, **f32), torch.empty(batch, n_p, E, **f32)
    _conv_bwd_fused_kernel[(n_e, n_p, batch)](
        x, weight, bias if bias is not None else dx, initial_state if initial_state is not None else dx,
        _flags(reset, dx), dy, d_final if d_final is not None else dx, dx, ds, dw, db, T, E,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), K=K, HAS_BIAS=bias is not None,
        HAS_STATE=initial_state is not None, HAS_DFINAL=d_final is not None, HAS_RESET=reset is not None,
        BLOCK_T=block_t, BLOCK_E=block_e, TILES=t.fused_tiles_per_program, num_warps=warps)
    return dx, dw.sum((0, 1)), db.sum((0, 1)), ds


def _backward_two_pass(t, dy, d_final, x, weight, bias, initial_state, reset):
    batch, T, E = x.shape
    K = weight.shape[1]
    block_t, block_e, warps = t.bwd_tile
    n_t, n_e = triton.cdiv(T, block_t), triton.cdiv(E, block_e)
    dpre = torch.empty(batch, T, E, device=x.device, dtype=torch.float32)
    dw = torch.empty(batch, n_t, E, K, device=x.device, dtype=torch.float32)
    db = torch.empty(batch, n_t, E, device=x.device, dtype=torch.float32)
    state = initial_state if initial_state is not None else dpre
    flags = _flags(reset, dpre)
    _conv_bwd_dpre_kernel[(n_e, n_t, batch)](
        x, weight, bias if bias is not None else dpre, state, flags, dy, dpre, dw, db, T, E,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), K=K, HAS_BIAS=bias is not None,
        HAS_STATE=initial_state is not None, HAS_RESET=reset is not None,
        BLOCK_T=block_t, BLOCK_E=block_e, num_warps=warps)
    dx = torch.empty(batch, T, E, device=x.device, dtype=x.dtype)
    ds = torch.empty(batch, E, K - 1, device=x.device, dtype=torch.float32)
    _conv_bwd_dx_kernel[(n_e, triton.cdiv(T + K - 1, block_t), batch)](
        weight, flags, dpre, d_final if d_final is not None else dpre, dx, ds, T, E, K=K,
        HAS_STATE=initial_state is not None, HAS_DFINAL=d_final is not None, HAS_RESET=reset is not None,
        BLOCK_T=block_t, BLOCK_E=block_e, num_warps=warps)
    return dx, dw.sum((0, 1)), db.sum((0, 1)), ds


@torch.library.custom_op("samba_lm::causal_conv1d_fwd", mutates_args=())
def _conv_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 initial_state: torch.Tensor | None, reset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return conv_forward(x, weight, bias, initial_state, reset)


@_conv_fwd_op.register_fake
def _(x, weight, bias, initial_state, reset):
    return torch.empty_like(x), x.new_empty(x.shape[0], x.shape[2], weight.shape[1] - 1)


@torch.library.custom_op("samba_lm::causal_conv1d_bwd", mutates_args=())
def _conv_bwd_op(dy: torch.Tensor, d_final: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, initial_state: torch.Tensor | None,
                 reset: torch.Tensor | None) -> list[torch.Tensor]:
    return list(conv_backward(dy, d_final, x, weight, bias, initial_state, reset))


@_conv_bwd_op.register_fake
def _(dy, d_final, x, weight, bias, initial_state, reset):
    f32 = dict(dtype=torch.float32)
    return [torch.empty_like(x), weight.new_empty(weight.shape, **f32), x.new_empty(x.shape[2], **f32),
            x.new_empty(x.shape[0], x.shape[2], weight.shape[1] - 1, **f32)]


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # x, weight, bias, initial_state, reset
    ctx.tuning = tuning.current("conv")


def _backward(ctx, dy, d_final):
    x, weight, bias, initial_state, reset = ctx.saved_tensors
    with tuning.tuned(conv=ctx.tuning):  # the forward's: autograd's CUDA thread sees the defaults
        dx, dw, db, ds = _conv_bwd_op(dy.contiguous(), d_final, x, weight, bias, initial_state, reset)
    return (dx, dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else None,
            ds.to(initial_state.dtype) if initial_state is not None else None, None)


torch.library.register_autograd("samba_lm::causal_conv1d_fwd", _backward, setup_context=_setup)


@torch.library.custom_op("samba_lm::causal_conv1d_step", mutates_args=("state",))
def _conv_step_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor,
                  reset: torch.Tensor | None) -> torch.Tensor:
    batch, _, E = x.shape
    y = torch.empty_like(x)
    block_e = min(1024, triton.next_power_of_2(E))
    _conv_step_kernel[(batch, triton.cdiv(E, block_e))](x, weight.contiguous(), bias if bias is not None else y, state,
                                                        _flags(reset, y), y, E, x.stride(0), K=weight.shape[1],
                                                        HAS_BIAS=bias is not None, HAS_RESET=reset is not None,
                                                        BLOCK_E=block_e, num_warps=4)
    return y


@_conv_step_op.register_fake
def _(x, weight, bias, state, reset):
    return torch.empty_like(x)


def causal_conv1d_triton(x, weight, bias=None, initial_state=None, reset=None):
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, initial_state))
    if (x.shape[1] == 1 and not needs_grad and initial_state is not None and initial_state.is_contiguous()
            and x.stride(-1) == 1):
        # Decode: one step, the state shifted in place and returned (see ops.causal_conv1d).
        return _conv_step_op(x, weight, bias, initial_state, reset), initial_state
    return _conv_fwd_op(x, weight, bias, initial_state, reset)
