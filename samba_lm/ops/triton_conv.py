"""Causal depthwise conv1d + bias + SiLU in Triton, forward and backward, with the carried state.

Layout (as `conv.py`): x [B, T, E] with channels contiguous, weight [E, K], bias [E], initial_state
[B, E, K-1] (the K-1 inputs before x).

Forward, a step at a time: a program takes BLOCK_E channels of one row over a range of time steps, a
thread a few contiguous channels (coalesced rows). It keeps the last K-1 inputs in registers, so each
input is loaded once, and loads the next BLOCK_T rows while it computes these. Its window starts from
the K-1 inputs before its range (the state's slots before 0); the last program along time writes the
final state the same way, as the window a step T would read.

Backward, one kernel (`ConvTuning.fused_backward`): a program walks a range of time steps of one row
and BLOCK_E channels a step at a time, BLOCK_T rows loaded ahead. It keeps a window of the last K-1
inputs and of their gradients so far in registers: step t recomputes the pre-activation (K FMAs) and
dpre_t, adds w_k dpre_t to the gradient of input t-K+1+k (the transposed conv, scattered), and the
oldest input, now complete, leaves the window as dx (or d initial_state, for the state's slots). Before
its range it computes the K-1 outputs that read its first inputs (from the window of inputs those read),
for their share of those inputs' gradients: no dpre goes to memory and no thread reads another's. d
weight and d bias accumulate elementwise in float32 registers, one partial per (row, program along
time), added up afterwards in a fixed order (deterministic).

Backward, two passes (`fused_backward=False`): per output tile, the pre-activation again (K cached
loads) and its gradient dpre, kept in float32 [B, T, E] (a transient 4 bytes per element), with partial
sums of d weight and d bias per (row, time block); then per input tile s (from -(K-1), the state's
slots, to T-1), dx_s = sum_j w_j dpre_{s+K-1-j} (or d initial_state for s < 0).

What the reference covers that this does not: float64, CPUs.

Document resets (reset [B, T] bool, HAS_RESET): the walking kernels need one flag a step: a document
start zeroes the window's inputs and stops their gradients taking more (a window built before a range
looks at the K-1 flags before it). So the final state holds zeros in the slots before the last reset;
the launcher zeroes their gradient. The two passes' tiles instead read, for a tap of output t, input s
only from s >= the first input t may see (`_first_seen`: its document's start within the window), and
take for dx of input s outputs only up to the last one that sees it (`_last_seen`). Without resets the
kernels load no flags.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import tuning
from .conv import slots_before_last_reset
from .triton_common import output_rows


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
def _flag_rows(r_row, base, bound, BLOCK_T: tl.constexpr):
    """Whether a document starts at each of steps base .. base+BLOCK_T-1 (a tuple of scalars; False
    outside [0, bound))."""
    starts = ()
    for r in tl.static_range(BLOCK_T):
        t = base + r
        starts = starts + (tl.load(r_row + t, mask=(t >= 0) & (t < bound), other=0) != 0,)
    return starts


@triton.jit
def _x_rows(x_row, base, bound, zi, em, s_xt, BLOCK_T: tl.constexpr):
    """Steps base .. base+BLOCK_T-1 of one row (x or dy) as loaded, not converted, so that a block the
    forward loads ahead stays in flight while the one before it is computed. Zeros outside [0, bound)."""
    xs = ()
    for r in tl.static_range(BLOCK_T):
        tv = base + r + zi  # the interpreter rejects scalar & vector masks
        xs = xs + (tl.load(x_row + (base + r) * s_xt, mask=em & (tv >= 0) & (tv < bound), other=0.0),)
    return xs


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _window(x_row, s_row, r_row, t, zi, em, s_xt, K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr):
    """Step t's window: inputs t-K+1 .. t-1 in float32 (before 0, the state's slots: s_row points at
    the row's slot for input 0) and, per input, 1.0 if step t sees it, or 0.0 (its value zeroed) when a
    document starts after it and before t. A start at t itself is the step's own to apply."""
    xwin, seen = (), ()
    for k in tl.static_range(K - 1):
        s = t - (K - 1) + k
        x = tl.load(x_row + s * s_xt, mask=em & (s + zi >= 0), other=0.0).to(tl.float32)
        if HAS_STATE:
            x += tl.load(s_row + s, mask=em & (s + zi < 0) & (s + zi >= -(K - 1)), other=0.0).to(tl.float32)
        keep = tl.full((), 1.0, tl.float32)
        if HAS_RESET:
            for j in tl.static_range(k + 1, K - 1):
                r = t - (K - 1) + j
                keep = tl.where(tl.load(r_row + r, mask=r >= 0, other=0) != 0, 0.0, keep)
            x = tl.where(keep > 0.0, x, 0.0)
        xwin, seen = xwin + (x,), seen + (keep,)
    return xwin, seen


@triton.jit
def _sigmoid(pre):
    return 1.0 / (1.0 + tl.exp2(-(pre * LOG2E)))  # exp2: without tl.exp's range checks


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, s_ptr, r_ptr, y_ptr, f_ptr, T, E, s_xb, s_xt,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, TILES: tl.constexpr):
    """Outputs t0 .. t1-1 (TILES blocks of BLOCK_T steps) of one row and BLOCK_E channels, a step at a
    time: each input is loaded once, the last K-1 stay in registers, and the next block's inputs are in
    flight while this one is computed. The last program along time writes the final state."""
    b, pid_t = tl.program_id(2), tl.program_id(1)
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    em, zi = e < E, tl.zeros_like(e)
    t0 = pid_t * (TILES * BLOCK_T)
    t1 = tl.minimum(t0 + TILES * BLOCK_T, T)
    x_row, y_row, r_row = x_ptr + b * s_xb + e, y_ptr + b * T * E + e, r_ptr + b * T
    s_row = s_ptr + (b * E + e) * (K - 1) + K - 1
    bias = tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros([BLOCK_E], tl.float32)
    w = ()
    for k in tl.static_range(K):
        w = w + (tl.load(w_ptr + e * K + k, mask=em, other=0.0).to(tl.float32),)
    xwin, _ = _window(x_row, s_row, r_row, t0, zi, em, s_xt, K, HAS_STATE, HAS_RESET)
    next_x = _x_rows(x_row, t0, t1, zi, em, s_xt, BLOCK_T)
    for base in range(t0, t1, BLOCK_T):
        xs = next_x
        next_x = _x_rows(x_row, base + BLOCK_T, t1, zi, em, s_xt, BLOCK_T)
        if HAS_RESET:
            starts = _flag_rows(r_row, base, t1, BLOCK_T)
        for r in tl.static_range(BLOCK_T):
            x = xs[r].to(tl.float32)
            if HAS_RESET:  # a document starting here sees none of the inputs before it
                kept = ()
                for k in tl.static_range(K - 1):
                    kept = kept + (tl.where(starts[r], 0.0, xwin[k]),)
                xwin = kept
            pre = bias  # the taps in the order of the backward's recomputation: the same dpre
            for k in tl.static_range(K - 1):
                pre += w[k] * xwin[k]
            pre += w[K - 1] * x
            y = pre * _sigmoid(pre)
            tl.store(y_row + (base + r) * E, y.to(y_ptr.dtype.element_ty), mask=em & (base + r + zi < t1))
            xwin = xwin[1:] + (x,)
    if pid_t == tl.num_programs(1) - 1:  # the final state: the last K-1 inputs, as a step T would see them
        final, _ = _window(x_row, s_row, r_row, T, zi, em, s_xt, K, HAS_STATE, HAS_RESET)
        for k in tl.static_range(K - 1):
            tl.store(f_ptr + (b * E + e) * (K - 1) + k, final[k].to(f_ptr.dtype.element_ty), mask=em)


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
def _conv_bwd_dx_kernel(w_ptr, r_ptr, dpre_ptr, dfinal_ptr, dx_ptr, ds_ptr, T, E, s_dxt,
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
    tl.store(dx_ptr + (b * T + s[:, None]) * s_dxt + e[None, :], dxcat.to(dx_ptr.dtype.element_ty),
             mask=in_x[:, None] & em[None, :])
    if HAS_STATE:
        in_state = s < 0
        slot = tl.where(in_state, s + K - 1, 0)
        tl.store(ds_ptr + (b * E + e[None, :]) * (K - 1) + slot[:, None], dxcat.to(ds_ptr.dtype.element_ty),
                 mask=in_state[:, None] & em[None, :])


@triton.jit
def _bwd_step(x, dy, start, xwin, gwin, seen, w, bias, K: tl.constexpr, HAS_RESET: tl.constexpr):
    """Output t, given input t (x), dy_t and the window before it (inputs t-K+1 .. t-1, their gradients
    so far, whether t sees them): dpre_t, the inputs it read (zeroed before a document starting at t),
    the finished gradient of input t-K+1, and the next step's window."""
    if HAS_RESET:  # a document starting at t sees none of the inputs before it
        keep = 1.0 - start.to(tl.float32)
        x_kept, seen_kept = (), ()
        for k in tl.static_range(K - 1):
            x_kept, seen_kept = x_kept + (xwin[k] * keep,), seen_kept + (seen[k] * keep,)
        xwin, seen = x_kept, seen_kept
    pre = bias  # in the forward's order: the same dpre as the two passes
    for k in tl.static_range(K - 1):
        pre += w[k] * xwin[k]
    pre += w[K - 1] * x
    sig = _sigmoid(pre)
    dpre = dy * sig * (1.0 + pre * (1.0 - sig))  # 0 outside [0, T), as dy
    grads = ()
    for k in tl.static_range(K - 1):  # input t-K+1+k takes w_k dpre_t
        grads = grads + (gwin[k] + (w[k] * seen[k] if HAS_RESET else w[k]) * dpre,)
    one = tl.full((), 1.0, tl.float32)
    return dpre, xwin, grads[0], xwin[1:] + (x,), grads[1:] + (w[K - 1] * dpre,), seen[1:] + (one,)


@triton.jit
def _conv_bwd_fused_kernel(x_ptr, w_ptr, bias_ptr, s_ptr, r_ptr, dy_ptr, dfinal_ptr, dx_ptr, ds_ptr, dw_ptr, db_ptr,
                           T, E, s_xb, s_xt, s_yb, s_yt, s_dxt, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                           HAS_STATE: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_RESET: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, TILES: tl.constexpr):
    """Outputs t0 .. t1-1 (TILES blocks of BLOCK_T steps; the last program's reach T+K-2, where dpre is 0,
    to complete the last inputs) of one row and channel block, a step at a time, and the gradients of
    inputs t0-(K-1) .. t1-K. Before them, the K-1 outputs that read this program's first inputs (their
    dpre, not their d weight: other programs'), from the window of inputs they read."""
    b, pid_t = tl.program_id(2), tl.program_id(1)
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    em, zi = e < E, tl.zeros_like(e)
    t0 = pid_t * (TILES * BLOCK_T)
    t1 = tl.minimum(t0 + TILES * BLOCK_T, T + K - 1)
    lo = t0 - (K - 1)  # this program's first input
    # The row's pointers at step 0 (the state's and the final state's at their slots for input 0).
    x_row, dy_row, r_row = x_ptr + b * s_xb + e, dy_ptr + b * s_yb + e, r_ptr + b * T
    dx_row = dx_ptr + b * T * s_dxt + e
    s_row = s_ptr + (b * E + e) * (K - 1) + K - 1
    ds_row, df_row = ds_ptr + (b * E + e) * (K - 1) + K - 1, dfinal_ptr + (b * E + e) * (K - 1) - (T - (K - 1))
    zero = tl.zeros([BLOCK_E], dtype=tl.float32)
    bias = tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32) if HAS_BIAS else zero
    w, dw, gwin = (), (), ()
    for k in tl.static_range(K):
        w, dw = w + (tl.load(w_ptr + e * K + k, mask=em, other=0.0).to(tl.float32),), dw + (zero,)
    for k in tl.static_range(K - 1):
        gwin = gwin + (zero,)
    xwin, seen = _window(x_row, s_row, r_row, lo, zi, em, s_xt, K, HAS_STATE, HAS_RESET)
    # (Names of their own: a tuple the loop below carries must keep its length.)
    head_x = _x_rows(x_row, lo, T, zi, em, s_xt, K - 1)
    head_dy = _x_rows(dy_row, lo, T, zi, em, s_yt, K - 1)
    if HAS_RESET:
        head_starts = _flag_rows(r_row, lo, T, K - 1)
    for r in tl.static_range(K - 1):  # outputs lo .. t0-1: their gradients of inputs lo .. t0-1
        x_head = head_x[r].to(tl.float32)
        if HAS_STATE:
            x_head += tl.load(s_row + lo + r, mask=em & (lo + r + zi < 0), other=0.0).to(tl.float32)
        _, _, _, xwin, gwin, seen = _bwd_step(x_head, head_dy[r].to(tl.float32), head_starts[r] if HAS_RESET else 0,
                                              xwin, gwin, seen, w, bias, K, HAS_RESET)
    bound = tl.minimum(t1, T)  # no input or dy at or after t1 is needed
    db = zero
    for base in range(t0, t1, BLOCK_T):  # past t1 only in the last program: dy 0 there, nothing stored
        # The block's loads first, BLOCK_T rows in flight. (Loading the next block's before computing
        # this one's raised the registers, 168 to 248 at (8, 128, 1), and gave no time back.)
        xs = _x_rows(x_row, base, bound, zi, em, s_xt, BLOCK_T)
        dys = _x_rows(dy_row, base, bound, zi, em, s_yt, BLOCK_T)
        if HAS_RESET:
            starts = _flag_rows(r_row, base, T, BLOCK_T)
        for r in tl.static_range(BLOCK_T):
            t = base + r
            x = xs[r].to(tl.float32)  # t >= 0: the state's slots are the warm-up's inputs
            dpre, read, g, xwin, gwin, seen = _bwd_step(x, dys[r].to(tl.float32), starts[r] if HAS_RESET else 0,
                                                        xwin, gwin, seen, w, bias, K, HAS_RESET)
            db += dpre
            taps = ()
            for k in tl.static_range(K - 1):
                taps = taps + (dw[k] + dpre * read[k],)
            dw = taps + (dw[K - 1] + dpre * x,)
            # Input s = t-K+1 is complete (from -(K-1): the state's slots).
            s = t - (K - 1)
            sv = s + zi
            if HAS_DFINAL:  # the final state is the last K-1 inputs: its gradient lands on them directly
                g += tl.load(df_row + s, mask=em & (sv >= T - (K - 1)) & (sv < T), other=0.0).to(tl.float32)
            tl.store(dx_row + s * s_dxt, g.to(dx_ptr.dtype.element_ty), mask=em & (sv >= 0) & (sv < T))
            if HAS_STATE:
                tl.store(ds_row + s, g, mask=em & (sv < 0))
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
    """The training kernels' tiles (`tuning.tuned(conv=...)`). H200, B8 E4096 bf16, the kernels alone in
    CUDA graphs (2026-12-02; benchmarks/bench_conv.py times them through autograd against causal_conv1d).
    The forward a step at a time, the next rows in flight: 0.154 ms at L4096 and 0.561 at L16384 as
    shipped, against 0.192 / 0.736 for the [64 steps, 128 channels] tiles it replaced, whose K taps were
    K loads (24 settings: 4/8 rows, 2/4 channels a thread, 1/2 warps, 256 to 1024 steps a program; the
    best 0.148 / 0.553). The fused backward: 0.241 / 0.914 ms, against 0.312 / 1.169 before its warm-up
    outputs left the main loop and its sigmoid took exp2 (10 settings timed, 8 of them loading the next
    rows ahead: 0.254 / 0.997 at best). The two-pass backward: 1.27 ms at L4096."""

    fwd_tile: tuple[int, int, int] = (8, 256, 2)
    """The forward's (rows loaded ahead, BLOCK_E, warps): 4 channels a thread."""
    fwd_tiles_per_program: int = 32
    """Blocks of BLOCK_T steps that one forward program computes (here 256 steps, and K-1 inputs
    before them)."""
    bwd_tile: tuple[int, int, int] = (64, 64, 4)
    """The two-pass backward's (BLOCK_T, BLOCK_E, warps), both kernels."""
    fused_backward: bool = True
    """The one-kernel backward; off: the two passes (tests, the benchmark)."""
    fused_tile: tuple[int, int, int] = (8, 128, 1)
    """The fused backward's (rows loaded ahead, BLOCK_E, warps): 4 channels a thread, its window and
    accumulators in registers."""
    fused_tiles_per_program: int = 32
    """Blocks of BLOCK_T steps that one program of the fused backward walks (here 256 steps, and the
    K-1 outputs and 2(K-1) inputs before them; B8 L4096 runs 17 programs a row and channel block)."""


def _flags(reset, fallback):
    """reset as the kernels read it ([B, T] bytes, rows contiguous), or a dummy pointer without it."""
    return reset.contiguous().view(torch.uint8) if reset is not None else fallback


def conv_forward(x, weight, bias, initial_state, reset):
    batch, T, E = x.shape
    K = weight.shape[1]
    t = tuning.current("conv")
    block_t, block_e, warps = t.fwd_tile
    steps = block_t * t.fwd_tiles_per_program
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(batch, T, E, device=x.device, dtype=x.dtype)
    final = torch.empty(batch, E, K - 1, device=x.device, dtype=x.dtype)
    _conv_fwd_kernel[(triton.cdiv(E, block_e), triton.cdiv(T, steps), batch)](  # channels fastest
        x, weight.contiguous(), bias if bias is not None else y,
        initial_state.contiguous() if initial_state is not None else y, _flags(reset, y), y, final, T, E,
        x.stride(0), x.stride(1), K=K, HAS_BIAS=bias is not None, HAS_STATE=initial_state is not None,
        HAS_RESET=reset is not None, BLOCK_T=block_t, BLOCK_E=block_e, TILES=t.fwd_tiles_per_program,
        num_warps=warps)
    return y, final


def conv_backward(dy, d_final, x, weight, bias, initial_state, reset, dx_out=None):
    """dx, d weight, d bias (partials per (row, time block) summed in a fixed order: deterministic) and
    d initial_state, by the fused kernel or the two passes (`ConvTuning.fused_backward`). dx_out: where
    dx goes, x's shape with rows of any stride (the x half of in_proj's gradient, say)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    if d_final is not None and reset is not None:  # the final state's zeroed slots pass no gradient back
        d_final = d_final.masked_fill(slots_before_last_reset(reset, K=weight.shape[1]), 0.0)
    args = (dy, d_final.contiguous() if d_final is not None else None, x, weight.contiguous(), bias,
            initial_state.contiguous() if initial_state is not None else None, reset)
    t = tuning.current("conv")
    dx = output_rows(dx_out, x)
    return _backward_fused(t, dx, *args) if t.fused_backward else _backward_two_pass(t, dx, *args)


def _backward_fused(t, dx, dy, d_final, x, weight, bias, initial_state, reset):
    batch, T, E = x.shape
    K = weight.shape[1]
    block_t, block_e, warps = t.fused_tile
    steps = block_t * t.fused_tiles_per_program
    n_e, n_p = triton.cdiv(E, block_e), triton.cdiv(T + K - 1, steps)  # outputs to T+K-2 complete the inputs
    f32 = dict(device=x.device, dtype=torch.float32)
    ds = torch.empty(batch, E, K - 1, **f32)
    dw, db = torch.empty(batch, n_p, E, K, **f32), torch.empty(batch, n_p, E, **f32)
    _conv_bwd_fused_kernel[(n_e, n_p, batch)](
        x, weight, bias if bias is not None else dx, initial_state if initial_state is not None else dx,
        _flags(reset, dx), dy, d_final if d_final is not None else dx, dx, ds, dw, db, T, E,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dx.stride(1), K=K, HAS_BIAS=bias is not None,
        HAS_STATE=initial_state is not None, HAS_DFINAL=d_final is not None, HAS_RESET=reset is not None,
        BLOCK_T=block_t, BLOCK_E=block_e, TILES=t.fused_tiles_per_program, num_warps=warps)
    return dx, dw.sum((0, 1)), db.sum((0, 1)), ds


def _backward_two_pass(t, dx, dy, d_final, x, weight, bias, initial_state, reset):
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
    ds = torch.empty(batch, E, K - 1, device=x.device, dtype=torch.float32)
    _conv_bwd_dx_kernel[(n_e, triton.cdiv(T + K - 1, block_t), batch)](
        weight, flags, dpre, d_final if d_final is not None else dpre, dx, ds, T, E, dx.stride(1), K=K,
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


def _gradients(ctx, dy, d_final, backward):
    x, weight, bias, initial_state, reset = ctx.saved_tensors
    dy = torch.zeros_like(x) if dy is None else dy.contiguous()  # None: only the final state was used
    with tuning.tuned(conv=ctx.tuning):  # the forward's: autograd's CUDA thread sees the defaults
        dx, dw, db, ds = backward(dy, d_final, x, weight, bias, initial_state, reset)
    return (dx, dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else None,
            ds.to(initial_state.dtype) if initial_state is not None else None, None)


def _backward(ctx, dy, d_final):
    return _gradients(ctx, dy, d_final, _conv_bwd_op)


torch.library.register_autograd("samba_lm::causal_conv1d_fwd", _backward, setup_context=_setup)


class _EagerConv(torch.autograd.Function):
    """The op's forward and backward without the custom ops' dispatch, for eager calls: on an H200's
    host one forward+backward took 0.87 ms through the ops and 0.68 ms this way, about what the kernels
    take at B8 L4096. torch.compile and dispatch modes (opcheck, fake tensors) get the ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, reset):
        ctx.set_materialize_grads(False)  # an unused final state: no d_final to read
        _setup(ctx, (x, weight, bias, initial_state, reset), None)
        return conv_forward(x, weight, bias, initial_state, reset)

    @staticmethod
    def backward(ctx, dy, d_final):
        return _gradients(ctx, dy, d_final, conv_backward)


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
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return _conv_fwd_op(x, weight, bias, initial_state, reset)
    if not needs_grad:
        return conv_forward(x, weight, bias, initial_state, reset)
    return _EagerConv.apply(x, weight, bias, initial_state, reset)
