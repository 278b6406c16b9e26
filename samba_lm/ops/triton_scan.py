"""Selective scan in Triton: forward and backward, softplus / D skip / SiLU(z) gate fused, state in and out.

Layout and limits (same shape alphabet as `scan.py`): u, delta, z [B, T, E] with the channel dim
contiguous; B, C [B, T, N]; A [E, N]; D, delta_bias [E]; initial_state [B, E, N]. Inputs may be
fp16, bf16 or fp32; state, accumulation and every gradient are fp32 (cast to the input's dtype at
the end). float64 is the reference's job: the dispatcher never sends it here.

Forward, when batch x channels fill the GPU: one warp per (batch row, 32 channels) steps through time,
each thread holding one channel's N states, two steps per loop iteration so that two steps of loads
are in flight. Otherwise (few rows, little parallelism): one program per (batch row, BLOCK_E
channels) walks time in chunks. A chunk is a [BLOCK_T, BLOCK_E, N] register tile: decays exp(dt*A)
and inputs dt*u*B, combined by `tl.associative_scan` along time, plus the carried state times the
cumulative decay. Time is the leading axis so that Triton's default layout spreads channels and
states over threads and keeps a thread's time steps in its registers: the scan is then sequential
within a thread (with time last, across threads, the forward took 9.96 ms instead of 5.03 ms at B=8,
L=4096, E=4096 on an H100). Both forwards save the state entering each chunk of steps (fp32,
[B, chunks, N, E]: every BLOCK_T steps, or `sequential_carry_t` when the step-at-a-time backward
follows) for the backward; nothing else is saved.

The step-at-a-time kernels hold states as [N, E] tiles with channels across threads: A, the carries
and the states they read and write are [N, E]-major, B and C are made fp32 once (no per-thread
conversions) and loaded as [N, 1] columns that broadcast in registers. How Triton lays these tiles
out decides the speed (states across threads cost a shuffle reduction per step): `zero` below keeps
it from vectorizing [N, E] accesses into a second layout.

Few rows: the step-at-a-time forward also splits time into segments walked in parallel, twice.
PASS 1 walks each segment but the last from a zero state and keeps its end state and its sum of dt;
PASS 2 combines them in order into the state entering its segment (h <- exp(A sum dt) h + end), then
walks it with outputs (and, training, saves its carries). About 1.5x the exponentials of one walk,
for segments x the programs: H200, B=1, L=4096, E=4096: 0.36 ms in 33 segments against 1.59 ms in
one walk and 0.93 ms for the chunked kernel before (mamba_ssm: 0.32 ms). The backward of such a
forward splits time the same way, in segments of whole carry segments: its PASS 1 walks each segment
but the first in reverse from a zero state gradient (q_t = a_t (dy'_t C_t + q_{t+1}) needs no states)
and keeps its q at the segment's start and its sum of dt; PASS 2 combines the later segments' into
the gradient entering its segment's end, then runs the backward below over it.

Decode: a one-token call without gradients runs `_scan_step_kernel`, which reads and writes the
state once, in place, and returns it as the final state.

Backward, step at a time (when the forward is): one warp per (batch row, 32 channels) walks the
`sequential_carry_t`-step segments last first. It recomputes a segment's states and dt from the saved
carry into a per-program scratch (17 KB, meant to stay in L2), then walks the segment in reverse
carrying q_t = a_t g_t, so g_t = dy'_t C_t + q_{t+1} needs no shifted decay: one exponential per
step and pass, and no second softplus. While it walks, it asks L2 for the next segment's carry and
inputs (`prefetch.global.L2`), which the recompute would otherwise wait for from DRAM; the forward
and the backward's PASS 1 ask `prefetch_steps` ahead. Each step's dB and dC are summed over the
warp's channels and written per program: with d_state 16, by a reduce-scatter in PTX (31 shuffles:
lane l ends with the sum of value l of the 32) where `tl.sum` would reduce each of the 32 values
over the lanes (160 shuffles).

Backward, chunked: one program per (batch row, superblock of channels) walks the chunks in reverse;
inside a chunk it visits the superblock's channel blocks, recomputes the chunk's states from the saved
carry, and runs the reverse scan g_t = dy'_t C_t + a_{t+1} g_{t+1} (the shifted decay a_{t+1} is
recomputed from delta at t+1, so no register shift is needed). The sums over channels of dB and dC
stay in registers across the superblock and are written once per (superblock, chunk).

Document resets (reset [B, T] bool, read as bytes; HAS_RESET): a document's first step has decay 0.
The chunked kernels put that zero into the scan's decays (forward and backward, a_t and a_{t+1}); the
step-at-a-time ones zero the state with a `where` before the step (and stop the backward's q there).
A state that a reset drops is dropped by a `where`, never only multiplied by zero, since it may be
anything (an initial state that a reset at t = 0 ignores may be NaN). Time segments: a segment holding
a reset forgets the state entering it (PASS 1 makes its sum of dt inf). Without resets the kernels
are today's: HAS_RESET is a constexpr, no flag is loaded.

Both backwards write partial sums (dB and dC per program, dA, dD and d(delta_bias) per row) that are
added up afterwards in a fixed order, with no atomics: the backward is deterministic, run to run.

What the reference covers that this does not: float64, and CPUs (except under TRITON_INTERPRET=1,
which has no PTX: there the backward sums dB and dC with `tl.sum`; the PTX path is tested on GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import tuning
from .triton_common import interpreting, multiprocessors, output_rows, row_stride

# ----------------------------------------------------------------------------- kernels


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def _reduce_scatter_ptx(n: int) -> str:
    """PTX that sums 2n values (n per operand, n = 16) over a warp's 32 lanes, a reduce-scatter: five
    butterfly stages, each halving the values a lane holds, so lane l ends with the sum of value l.
    31 shuffles where `tl.sum` over lanes takes 5 per value (160). Every output gets that sum."""
    lines = ["{", ".reg .pred p;", ".reg .b32 lane, bit;", f".reg .f32 v<{2 * n}>, snd, kp;",
             "mov.u32 lane, %laneid;"]
    lines += [f"mov.f32 v{i}, ${n + i};" for i in range(2 * n)]  # the inputs follow the n outputs
    half, mask = n, 16
    while half >= 1:
        lines += [f"and.b32 bit, lane, {mask};", "setp.ne.u32 p, bit, 0;"]
        for i in range(half):  # a lane with the bit keeps the upper half and sends the lower
            lines += [f"selp.f32 snd, v{i}, v{i + half}, p;", f"selp.f32 kp, v{i + half}, v{i}, p;",
                      f"shfl.sync.bfly.b32 snd, snd, {mask}, 31, -1;", f"add.f32 v{i}, kp, snd;"]
        half, mask = half // 2, mask // 2
    lines += [f"mov.f32 ${i}, v0;" for i in range(n)] + ["}"]
    return "\n".join(lines)


REDUCE_SCATTER_PTX = tl.constexpr(_reduce_scatter_ptx(16))
SCATTER_CONSTRAINTS = tl.constexpr("=f," * 16 + "f," * 31 + "f")


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _first(a, b):
    return a


@triton.jit
def _warp_sums(x, y):
    """Sums over a warp's 32 lanes (one channel each) of x and y, [16, E] with a thread's 16 values in
    its registers: lane l gets value l of (x, y) concatenated, returned as ([1, E] sums, [1, E] l)."""
    s = tl.inline_asm_elementwise(REDUCE_SCATTER_PTX, SCATTER_CONSTRAINTS, [x, y], dtype=tl.float32,
                                  is_pure=True, pack=16)
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [x.to(tl.int32, bitcast=True)],
                                     dtype=tl.int32, is_pure=True, pack=1)
    return tl.reduce(s, 0, _first, keep_dims=True), tl.reduce(lane, 0, _first, keep_dims=True)


@triton.jit
def _softplus(x):
    # exp2 is one MUFU.EX2; tl.exp adds a range check and two multiplies for denormal results, which
    # softplus rounds away (1 + e)
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp2(x * LOG2E)))  # torch's threshold: linear above 20


@triton.jit
def _starts(r_ptr, b, t, T):
    """Whether a document starts at step t of row b (t a scalar or a vector; False outside [0, T)):
    the state before t is then dropped, a decay of zero. r_ptr: the resets, [B, T] bytes."""
    return tl.load(r_ptr + b * T + t, mask=(t >= 0) & (t < T), other=0) != 0


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, r_ptr, y_ptr, hT_ptr, carry_ptr,
    T, E, N, s_ub, s_ut, s_db, s_dt, s_Bb, s_Bt, s_Cb, s_Ct, s_zb, s_zt,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_RESET: tl.constexpr, SAVE_CARRIES: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    tt = tl.arange(0, BLOCK_T)
    em, nm = e < E, n < N
    en = em[:, None] & nm[None, :]
    en_offs = e[:, None] * N + n[None, :]
    ne_offs = e[:, None] + n[None, :] * E  # carries are [N, E]-major, as the step-at-a-time kernels want
    A = tl.load(A_ptr + en_offs, mask=en, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + e, mask=em, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + b * E * N + en_offs, mask=en, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    n_chunks = tl.cdiv(T, BLOCK_T)
    for c in range(0, n_chunks):
        if SAVE_CARRIES:
            tl.store(carry_ptr + (b * n_chunks + c) * E * N + ne_offs, h, mask=en)
        if HAS_RESET:  # dropped by a where, not only by the zero decay below: it may be anything (NaN)
            h = tl.where(_starts(r_ptr, b, c * BLOCK_T, T), 0.0, h)
        t = c * BLOCK_T + tt
        tm = t < T
        m = tm[:, None] & em[None, :]
        uu = tl.load(u_ptr + b * s_ub + t[:, None] * s_ut + e[None, :], mask=m, other=0.0).to(tl.float32)
        dt = tl.load(dl_ptr + b * s_db + t[:, None] * s_dt + e[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias[None, :]
        dt = tl.where(m, _softplus(dt), 0.0)  # padding steps: decay 1, input 0, state unchanged
        tn = tm[:, None] & nm[None, :]
        Bt = tl.load(B_ptr + b * s_Bb + t[:, None] * s_Bt + n[None, :], mask=tn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + b * s_Cb + t[:, None] * s_Ct + n[None, :], mask=tn, other=0.0).to(tl.float32)
        decay = tl.exp(dt[:, :, None] * A[None, :, :])  # [T, E, N]: time leads, so it stays in-thread
        if HAS_RESET:
            decay = tl.where(_starts(r_ptr, b, t, T)[:, None, None], 0.0, decay)
        inputs = (dt * uu)[:, :, None] * Bt[:, None, :]
        cum, hs = tl.associative_scan((decay, inputs), axis=0, combine_fn=_combine)
        hs += cum * h[None, :, :]
        y = tl.sum(hs * Ct[:, None, :], axis=2)
        h = tl.sum(tl.where((tt == BLOCK_T - 1)[:, None, None], hs, 0.0), axis=0)
        if HAS_D:
            y += Dv[None, :] * uu
        if HAS_Z:
            zz = tl.load(z_ptr + b * s_zb + t[:, None] * s_zt + e[None, :], mask=m, other=0.0).to(tl.float32)
            y *= zz * tl.sigmoid(zz)
        tl.store(y_ptr + (b * T + t[:, None]) * E + e[None, :], y.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(hT_ptr + b * E * N + en_offs, h, mask=en)


@triton.jit
def _prefetch(ptrs, ON: tl.constexpr):
    """Asks L2 for the lines holding ptrs, without waiting or a register: a load of them some steps
    later then hits L2 instead of waiting on DRAM. The addresses must be in bounds (callers clamp).
    ON false (the interpreter runs no PTX): nothing."""
    if ON:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\nmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _seq_prefetch(u_ptr, dl_ptr, z_ptr, dy_ptr, b, t, T, e, E, s_ub, s_ut, s_db, s_dt, s_zb, s_zt, s_yb, s_yt,
                  HAS_U: tl.constexpr, HAS_Z: tl.constexpr, HAS_DY: tl.constexpr, ON: tl.constexpr):
    """Step t's per-channel inputs asked of L2 (delta, and u, z, dy as the flags say), t clamped into
    [0, T) and the channels into [0, E): the step-at-a-time kernels ask some steps ahead of their loads."""
    if ON:
        t = tl.minimum(tl.maximum(t, 0), T - 1)
        e = tl.minimum(e, E - 1)
        _prefetch(dl_ptr + b * s_db + t * s_dt + e, True)
        if HAS_U:
            _prefetch(u_ptr + b * s_ub + t * s_ut + e, True)
        if HAS_Z:
            _prefetch(z_ptr + b * s_zb + t * s_zt + e, True)
        if HAS_DY:
            _prefetch(dy_ptr + b * s_yb + t * s_yt + e, True)


@triton.jit
def _seq_channels(A_ptr, D_ptr, bias_ptr, pid, E, N: tl.constexpr, zero, HAS_D: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program `pid`'s channels e [1, E] and states n [N, 1], their masks, [N, E]-major offsets (see
    `zero` below), and its A [N, E], D and delta_bias (0 when absent), in fp32."""
    e = pid * BLOCK_E + tl.arange(0, BLOCK_E)[None, :]
    n = tl.arange(0, BLOCK_N)[:, None]
    em, nm = e < E, n < N
    ne = nm & em
    ne_offs = n * E + e + zero
    A = tl.load(A_ptr + ne_offs, mask=ne, other=0.0).to(tl.float32)
    Dv = tl.load(D_ptr + e, mask=em, other=0.0).to(tl.float32) if HAS_D else 0.0
    bias = tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    return e, n, em, nm, ne, ne_offs, A, Dv, bias


@triton.jit
def _seq_state(ptrs, mask, GIVEN: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """An [N, E] fp32 state (or state gradient) read from `ptrs`, or zeros when none is given."""
    if GIVEN:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)


@triton.jit
def _seq_load(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, r_ptr, b, t, T, e, n, em, nm, s_ub, s_ut, s_db, s_dt,
              s_Bb, s_Bt, s_Bn, s_Cb, s_Ct, s_Cn, s_zb, s_zt, HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr):
    """Step t's inputs and whether a document starts there. Past the end it reloads the last step
    (the caller keeps it out of the state) and starts no document: no time masks, so the B and C
    loads, N per thread, need no per-element predicates."""
    rr = _starts(r_ptr, b, t, T) if HAS_RESET else False
    t = tl.minimum(t, T - 1)
    uu = tl.load(u_ptr + b * s_ub + t * s_ut + e, mask=em, other=0.0)
    dt = tl.load(dl_ptr + b * s_db + t * s_dt + e, mask=em, other=0.0)
    zz = tl.load(z_ptr + b * s_zb + t * s_zt + e, mask=em, other=0.0) if HAS_Z else uu
    Bv = tl.load(B_ptr + b * s_Bb + t * s_Bt + n * s_Bn, mask=nm, other=0.0)  # [N, 1]: broadcast in registers
    Cv = tl.load(C_ptr + b * s_Cb + t * s_Ct + n * s_Cn, mask=nm, other=0.0)
    return uu, dt, zz, Bv, Cv, rr


@triton.jit
def _seq_step(h, uu, dt, zz, Bv, Cv, rr, A, Dv, bias, ok, HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr):
    """h <- exp(dt A) h + dt u B, y = C.h + D u, gated by SiLU(z); a step past the end leaves h alone,
    a document's first step (rr) starts from h = 0 (a where: the state it drops may be anything)."""
    if HAS_RESET:
        h = tl.where(rr, 0.0, h)
    uu, Bv, Cv = uu.to(tl.float32), Bv.to(tl.float32), Cv.to(tl.float32)
    dt = tl.where(ok, _softplus(dt.to(tl.float32) + bias), 0.0)
    h = tl.exp2(dt * A) * h + (dt * uu) * Bv  # A comes scaled by log2(e)
    y = tl.sum(h * Cv, axis=0)[None, :] + Dv * uu
    if HAS_Z:
        zf = zz.to(tl.float32)
        y *= zf * tl.sigmoid(zf)
    return h, y, dt


# The step-at-a-time kernels want one layout throughout: a thread per channel, its N states in
# registers. [N, E] tensors are addressed with `zero` added, a 0 whose alignment Triton does not know:
# a provably aligned address would make Triton load in vectors, in another layout than the step's,
# and convert through shared memory at every step.
@triton.jit(do_not_specialize=["zero"])
def _scan_fwd_seq_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, r_ptr, y_ptr, hT_ptr, carry_ptr, ends_ptr,
    dts_ptr, T, E, N: tl.constexpr, s_ub, s_ut, s_db, s_dt, s_Bb, s_Bt, s_Cb, s_Ct, s_zb, s_zt, s_Bn, s_Cn, zero,
    SEG, SEGS, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_RESET: tl.constexpr, SAVE_CARRIES: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
    CARRY_T: tl.constexpr, STEPS: tl.constexpr, PASS: tl.constexpr, PREFETCH: tl.constexpr,
):
    """One step at a time: a thread owns one channel and its N states in registers, so the state
    update and the C.h sum never leave the thread. The loop takes STEPS (1 or 2) steps per iteration
    and loads the next iteration's inputs during this one: STEPS=2 keeps two steps of loads in flight.

    Program (b, channels, s) walks time segment s, steps [s SEG, (s + 1) SEG). PASS 0: one segment,
    the whole stream. PASS 1: a segment's end state from zero and its sum of dt (no outputs). PASS 2:
    the state entering segment s from the segments before it (h <- exp(A sum dt) h + end, in order),
    then the walk with outputs; the last segment writes the final state. A segment holding a document
    start forgets the state entering it: PASS 1 makes its sum of dt inf (sticky: inf + dt = inf)."""
    b = tl.program_id(0)
    s = tl.program_id(2)
    e, n, em, nm, ne, ne_offs, A, Dv, bias = _seq_channels(A_ptr, D_ptr, bias_ptr, tl.program_id(1), E, N, zero,
                                                           HAS_D, HAS_BIAS, BLOCK_E, BLOCK_N)
    zero_e = e * 0
    A = A * LOG2E  # for exp2
    if PASS == 1:
        h = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    else:
        h = _seq_state(h0_ptr + b * E * N + ne_offs, ne, HAS_H0, BLOCK_E, BLOCK_N)
    if PASS == 2:
        for j in range(0, s):
            seg_dt = tl.load(dts_ptr + (b * SEGS + j) * E + e, mask=em, other=0.0)
            h = tl.exp2(seg_dt * A) * h
            if HAS_RESET:  # a where: exp2(inf A) h is 0 only for A < 0
                h = tl.where(seg_dt == float("inf"), 0.0, h)
            h += tl.load(ends_ptr + (b * SEGS + j) * E * N + ne_offs, mask=ne, other=0.0)
    dt_sum = tl.zeros([1, BLOCK_E], dtype=tl.float32)
    t_begin = s * SEG
    t_end = tl.minimum(T, t_begin + SEG)
    u0, d0, z0, B0, C0, r0 = _seq_load(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, r_ptr, b, t_begin, T, e, n, em, nm,
                                       s_ub, s_ut, s_db, s_dt, s_Bb, s_Bt, s_Bn, s_Cb, s_Ct, s_Cn, s_zb, s_zt,
                                       HAS_Z, HAS_RESET)
    if STEPS == 2:
        u1, d1, z1, B1, C1, r1 = _seq_load(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, r_ptr, b, t_begin + 1, T, e, n, em, nm,
                                           s_ub, s_ut, s_db, s_dt, s_Bb, s_Bt, s_Bn, s_Cb, s_Ct, s_Cn, s_zb, s_zt,
                                           HAS_Z, HAS_RESET)
    for t in range(t_begin, t_end, STEPS):
        for k in tl.static_range(STEPS if PREFETCH > 0 else 0):  # L2 gets the inputs PREFETCH steps ahead
            _seq_prefetch(u_ptr, dl_ptr, z_ptr, u_ptr, b, t + PREFETCH + k, T, e, E, s_ub, s_ut, s_db, s_dt,
                          s_zb, s_zt, 0, 0, True, HAS_Z, False, True)
        if SAVE_CARRIES:
            if t % CARRY_T == 0:  # CARRY_T is a multiple of STEPS, SEG of CARRY_T
                tl.store(carry_ptr + (b * tl.cdiv(T, CARRY_T) + t // CARRY_T) * E * N + ne_offs, h, mask=ne)
        uu, dt, zz, Bv, Cv, rr = u0, d0, z0, B0, C0, r0
        u0, d0, z0, B0, C0, r0 = _seq_load(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, r_ptr, b, t + STEPS, T, e, n, em, nm,
                                           s_ub, s_ut, s_db, s_dt, s_Bb, s_Bt, s_Bn, s_Cb, s_Ct, s_Cn, s_zb, s_zt,
                                           HAS_Z, HAS_RESET)
        h, y, dt = _seq_step(h, uu, dt, zz, Bv, Cv, rr, A, Dv, bias, zero_e + t < t_end, HAS_Z, HAS_RESET)
        if PASS == 1:
            dt_sum += dt
            if HAS_RESET:
                dt_sum = tl.where(rr, float("inf"), dt_sum)
        else:
            tl.store(y_ptr + (b * T + t) * E + e, y.to(y_ptr.dtype.element_ty), mask=em)
        if STEPS == 2:
            uu, dt, zz, Bv, Cv, rr = u1, d1, z1, B1, C1, r1
            u1, d1, z1, B1, C1, r1 = _seq_load(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, r_ptr, b, t + 3, T, e, n, em, nm,
                                               s_ub, s_ut, s_db, s_dt, s_Bb, s_Bt, s_Bn, s_Cb, s_Ct, s_Cn, s_zb, s_zt,
                                               HAS_Z, HAS_RESET)
            h, y, dt = _seq_step(h, uu, dt, zz, Bv, Cv, rr, A, Dv, bias, zero_e + t + 1 < t_end, HAS_Z, HAS_RESET)
            if PASS == 1:
                dt_sum += dt
                if HAS_RESET:
                    dt_sum = tl.where(rr, float("inf"), dt_sum)
            else:
                y_mask = em & (zero_e + t + 1 < t_end)
                tl.store(y_ptr + (b * T + t + 1) * E + e, y.to(y_ptr.dtype.element_ty), mask=y_mask)
    if PASS == 1:
        tl.store(ends_ptr + (b * SEGS + s) * E * N + ne_offs, h, mask=ne)
        tl.store(dts_ptr + (b * SEGS + s) * E + e, dt_sum, mask=em)
    elif s == SEGS - 1:
        tl.store(hT_ptr + b * E * N + ne_offs, h, mask=ne)


@triton.jit
def _q_load(dl_ptr, C_ptr, z_ptr, dy_ptr, r_ptr, b, t, T, e, n, em, nm, s_db, s_dt, s_Cb, s_Ct, s_Cn, s_zb, s_zt,
            s_yb, s_yt, HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr):
    """What step t's state gradient needs: raw delta, dy, z (a placeholder without the gate), C and
    whether a document starts there."""
    rr = _starts(r_ptr, b, t, T) if HAS_RESET else False
    raw = tl.load(dl_ptr + b * s_db + t * s_dt + e, mask=em, other=0.0)
    dyy = tl.load(dy_ptr + b * s_yb + t * s_yt + e, mask=em, other=0.0)
    zz = tl.load(z_ptr + b * s_zb + t * s_zt + e, mask=em, other=0.0) if HAS_Z else dyy
    Cv = tl.load(C_ptr + b * s_Cb + t * s_Ct + n * s_Cn, mask=nm, other=0.0)
    return raw, dyy, zz, Cv, rr


@triton.jit(do_not_specialize=["zero"])
def _scan_bwd_seq_q_kernel(
    dl_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, r_ptr, dy_ptr, qs_ptr, dts_ptr, T, E, N: tl.constexpr,
    s_db, s_dt, s_Cb, s_Ct, s_Cn, s_zb, s_zt, s_yb, s_yt, zero, SEG, SEGS,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESET: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr,
):
    """PASS 1 of the backward in time segments, for segment s >= 1: the walk in reverse from a zero
    state gradient, q_t = a_t (dy'_t C_t + q_{t+1}), keeping q at the segment's first step and its sum
    of dt. No states are needed (dy' is dy gated by SiLU(z)): one exponential and no C.h a step.
    PASS 2 combines them (q <- exp(A sum dt) q + q_s, last segment first) into the gradient entering
    each segment's end. A document start in the segment (a_t = 0) makes its sum of dt inf."""
    b = tl.program_id(0)
    s = tl.program_id(2) + 1
    e, n, em, nm, ne, ne_offs, A, _, bias = _seq_channels(A_ptr, A_ptr, bias_ptr, tl.program_id(1), E, N, zero,
                                                          False, HAS_BIAS, BLOCK_E, BLOCK_N)
    A2 = A * LOG2E
    q = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    dt_sum = tl.zeros([1, BLOCK_E], dtype=tl.float32)
    t_begin = s * SEG
    t_end = tl.minimum(T, t_begin + SEG)
    nxt = _q_load(dl_ptr, C_ptr, z_ptr, dy_ptr, r_ptr, b, t_end - 1, T, e, n, em, nm, s_db, s_dt, s_Cb, s_Ct, s_Cn,
                  s_zb, s_zt, s_yb, s_yt, HAS_Z, HAS_RESET)
    for i in range(0, t_end - t_begin):
        _seq_prefetch(dl_ptr, dl_ptr, z_ptr, dy_ptr, b, t_end - 1 - i - PREFETCH, T, e, E, 0, 0, s_db, s_dt, s_zb,
                      s_zt, s_yb, s_yt, False, HAS_Z, True, PREFETCH > 0)
        raw, dyy, zz, Cv, rr = nxt
        # the earlier step's inputs load during this one (the segment's first step loads itself again)
        nxt = _q_load(dl_ptr, C_ptr, z_ptr, dy_ptr, r_ptr, b, tl.maximum(t_end - 2 - i, t_begin), T, e, n, em, nm,
                      s_db, s_dt, s_Cb, s_Ct, s_Cn, s_zb, s_zt, s_yb, s_yt, HAS_Z, HAS_RESET)
        dyy = dyy.to(tl.float32)
        if HAS_Z:
            zf = zz.to(tl.float32)
            dyy *= zf * tl.sigmoid(zf)
        dt = _softplus(raw.to(tl.float32) + bias)
        q = tl.exp2(dt * A2) * (dyy * Cv.to(tl.float32) + q)
        dt_sum += dt
        if HAS_RESET:
            q = tl.where(rr, 0.0, q)
            dt_sum = tl.where(rr, float("inf"), dt_sum)
    tl.store(qs_ptr + (b * SEGS + s) * E * N + ne_offs, q, mask=ne)
    tl.store(dts_ptr + (b * SEGS + s) * E + e, dt_sum, mask=em)


@triton.jit(do_not_specialize=["zero"])
def _scan_bwd_seq_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, r_ptr, carry_ptr, dy_ptr, dhT_ptr,
    du_ptr, ddl_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr, dh0_ptr, h_ptr, qs_ptr, dts_ptr,
    T, E, N: tl.constexpr, s_ub, s_ut, s_db, s_dt, s_Bb, s_Bt, s_Cb, s_Ct, s_zb, s_zt, s_yb, s_yt, s_dzt, s_Bn, s_Cn,
    zero, SEGC, SEGS, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DHT: tl.constexpr,
    HAS_RESET: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, CARRY_T: tl.constexpr,
    WARP_SUMS: tl.constexpr, PREFETCH: tl.constexpr,
):
    """The step-at-a-time backward: a thread owns one channel's N states. Each CARRY_T-step segment,
    last first, is recomputed forward from its saved carry (states parked in a per-program scratch
    meant to stay in L2), then walked in reverse carrying q_t = a_t g_t, so g_t = dy'_t C_t + q_{t+1}
    needs no shifted decay: one exponential per step and pass. At a document's first step a_t = 0:
    q stops there, and dA and d delta take nothing from the decay (a_t h_{t-1} = 0).

    Program (b, channels, s) walks time segment s: SEGC carry segments (SEGS = 1: the whole stream).
    Its state gradient at the segment's end combines the later segments' PASS-1 results, in order."""
    b = tl.program_id(0)
    pid = tl.program_id(1)
    s = tl.program_id(2)
    n_prog = tl.num_programs(1)
    e, n, em, nm, ne, ne_offs, A, Dv, bias = _seq_channels(A_ptr, D_ptr, bias_ptr, pid, E, N, zero,
                                                           HAS_D, HAS_BIAS, BLOCK_E, BLOCK_N)
    zero_e = e * 0
    A2 = A * LOG2E  # for exp2
    q = _seq_state(dhT_ptr + b * E * N + ne_offs, ne, HAS_DHT, BLOCK_E, BLOCK_N)
    for i in range(0, SEGS - 1 - s):  # the later segments, last first
        j = SEGS - 1 - i
        seg_dt = tl.load(dts_ptr + (b * SEGS + j) * E + e, mask=em, other=0.0)
        q = tl.exp2(seg_dt * A2) * q
        if HAS_RESET:  # a where: exp2(inf A) q is 0 only for A < 0
            q = tl.where(seg_dt == float("inf"), 0.0, q)
        q += tl.load(qs_ptr + (b * SEGS + j) * E * N + ne_offs, mask=ne, other=0.0)
    row = b * SEGS + s  # this program's partial sums of dA, dD and d delta_bias, and its scratch
    dA_acc = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    dD_acc = tl.zeros([1, BLOCK_E], dtype=tl.float32)
    db_acc = tl.zeros([1, BLOCK_E], dtype=tl.float32)
    # The scratch holds a carry segment's states and its dt: per step N + 1 rows of the program's channels.
    per_step: tl.constexpr = (BLOCK_N + 1) * BLOCK_E
    scratch = h_ptr + (row * n_prog + pid) * CARRY_T * per_step + n * BLOCK_E + tl.arange(0, BLOCK_E)[None, :] + zero
    dt_scratch = h_ptr + (row * n_prog + pid) * CARRY_T * per_step + BLOCK_N * BLOCK_E + tl.arange(0, BLOCK_E)[None, :]
    n_seg = tl.cdiv(T, CARRY_T)
    seg_end = tl.minimum(n_seg, (s + 1) * SEGC)
    for i in range(0, seg_end - s * SEGC):
        seg = seg_end - 1 - i
        h = tl.load(carry_ptr + (b * n_seg + seg) * E * N + ne_offs, mask=ne, other=0.0)
        # Recompute the segment's states into the scratch; the next step's inputs load during this one.
        t0 = seg * CARRY_T
        u_n, raw_n, _, B_n, _, r_n = _seq_load(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, r_ptr, b, t0, T, e, n, em, nm,
                                               s_ub, s_ut, s_db, s_dt, s_Bb, s_Bt, s_Bn, s_Cb, s_Ct, s_Cn, s_zb, s_zt,
                                               False, HAS_RESET)
        for j in range(0, CARRY_T):
            t = t0 + j
            uu, raw, Bv, rr = u_n.to(tl.float32), raw_n.to(tl.float32), B_n, r_n
            u_n, raw_n, _, B_n, _, r_n = _seq_load(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, r_ptr, b, t + 1, T, e, n, em,
                                                   nm, s_ub, s_ut, s_db, s_dt, s_Bb, s_Bt, s_Bn, s_Cb, s_Ct, s_Cn,
                                                   s_zb, s_zt, False, HAS_RESET)
            dt = tl.where(zero_e + t < T, _softplus(raw + bias), 0.0)  # past the end: the state stays
            if HAS_RESET:
                h = tl.where(rr, 0.0, h)
            h = tl.exp2(dt * A2) * h + (dt * uu) * Bv
            tl.store(scratch + j * per_step, h)
            tl.store(dt_scratch + j * per_step, dt)  # the reverse walk reads it, no second softplus
        # Walk it in reverse, again loading the next (earlier) step's inputs during this one, and
        # asking L2 for the next segment's carry and inputs (their loads would wait on DRAM).
        if PREFETCH:
            ne_in = n * E + tl.minimum(e, E - 1) + zero
            _prefetch(carry_ptr + (b * n_seg + tl.maximum(seg - 1, 0)) * E * N + ne_in, True)
        t1 = t0 + CARRY_T - 1
        u_n, raw_n, z_n, B_n, C_n, r_n = _seq_load(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, r_ptr, b, t1, T, e, n, em,
                                                   nm, s_ub, s_ut, s_db, s_dt, s_Bb, s_Bt, s_Bn, s_Cb, s_Ct, s_Cn,
                                                   s_zb, s_zt, HAS_Z, HAS_RESET)
        dy_n = tl.load(dy_ptr + b * s_yb + tl.minimum(t1, T - 1) * s_yt + e, mask=em, other=0.0)
        h_n = tl.load(scratch + (CARRY_T - 1) * per_step)
        dt_n = tl.load(dt_scratch + (CARRY_T - 1) * per_step)
        for jj in range(0, CARRY_T):
            j = CARRY_T - 1 - jj
            t = t0 + j
            ok = (zero_e + t) < T
            m = em & ok
            uu, raw, Bv, Cv, rr, h, dt = u_n.to(tl.float32), raw_n.to(tl.float32) + bias, B_n, C_n, r_n, h_n, dt_n
            dyy = tl.where(ok, dy_n.to(tl.float32), 0.0)
            zz = z_n.to(tl.float32)
            _seq_prefetch(u_ptr, dl_ptr, z_ptr, dy_ptr, b, t - CARRY_T, T, e, E, s_ub, s_ut, s_db, s_dt, s_zb, s_zt,
                          s_yb, s_yt, True, HAS_Z, True, PREFETCH)
            jp = tl.maximum(j - 1, 0)  # the segment's first step loads itself again, unused
            u_n, raw_n, z_n, B_n, C_n, r_n = _seq_load(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, r_ptr, b, t0 + jp, T, e, n,
                                                       em, nm, s_ub, s_ut, s_db, s_dt, s_Bb, s_Bt, s_Bn, s_Cb, s_Ct,
                                                       s_Cn, s_zb, s_zt, HAS_Z, HAS_RESET)
            dy_n = tl.load(dy_ptr + b * s_yb + tl.minimum(t0 + jp, T - 1) * s_yt + e, mask=em, other=0.0)
            h_n = tl.load(scratch + jp * per_step)
            dt_n = tl.load(dt_scratch + jp * per_step)
            decay = tl.exp2(dt * A2)
            if HAS_RESET:
                decay = tl.where(rr, 0.0, decay)
            dtu = dt * uu
            b_t = dtu * Bv
            if HAS_Z:
                y_pre = tl.sum(h * Cv, axis=0)[None, :] + Dv * uu
                sig = tl.sigmoid(zz)
                dz = dyy * y_pre * sig * (1.0 + zz * (1.0 - sig))
                tl.store(dz_ptr + (b * T + t) * s_dzt + e, dz.to(dz_ptr.dtype.element_ty), mask=m)
                dyy = dyy * zz * sig
            g = dyy * Cv + q
            q = decay * g
            g_ah = g * (h - b_t)  # a_t h_{t-1} = h_t - b_t
            if HAS_RESET:  # exactly 0, where an FMA would leave the rounding of b_t
                g_ah = tl.where(rr, 0.0, g_ah)
            d_dtu = tl.sum(g * Bv, axis=0)[None, :]
            ddt = d_dtu * uu + tl.sum(g_ah * A2, axis=0)[None, :] * LN2  # A2's registers serve: A itself is dead
            dA_acc += g_ah * dt
            ddl = tl.where(ok, ddt * tl.sigmoid(raw), 0.0)
            db_acc += ddl
            du = d_dtu * dt
            if HAS_D:
                du += dyy * Dv
                dD_acc += dyy * uu
            tl.store(du_ptr + (b * T + t) * E + e, du.to(du_ptr.dtype.element_ty), mask=m)
            tl.store(ddl_ptr + (b * T + t) * E + e, ddl.to(ddl_ptr.dtype.element_ty), mask=m)
            if WARP_SUMS:
                sums, lane = _warp_sums(g * dtu, dyy * h)
                k = lane % BLOCK_N
                part = ((b * n_prog + pid) * T + t) * N + k
                tl.store(tl.where(lane < BLOCK_N, dB_ptr, dC_ptr) + part, sums, mask=(k < N) & ok)
            else:
                part = ((b * n_prog + pid) * T + t) * N + tl.arange(0, BLOCK_N)
                okn = (tl.arange(0, BLOCK_N) < N) & ((tl.arange(0, BLOCK_N) * 0 + t) < T)
                tl.store(dB_ptr + part, tl.sum(g * dtu, axis=1), mask=okn)
                tl.store(dC_ptr + part, tl.sum(dyy * h, axis=1), mask=okn)
    if s == 0:
        tl.store(dh0_ptr + b * E * N + ne_offs, q, mask=ne)
    tl.store(dA_ptr + row * E * N + ne_offs, dA_acc, mask=ne)
    if HAS_D:
        tl.store(dD_ptr + row * E + e, dD_acc, mask=em)
    if HAS_BIAS:
        tl.store(dbias_ptr + row * E + e, db_acc, mask=em)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, r_ptr, carry_ptr, dy_ptr, dhT_ptr,
    du_ptr, ddl_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr, dh0_ptr, g_ptr,
    T, E, N, N_SUB, s_ub, s_ut, s_db, s_dt, s_Bb, s_Bt, s_Cb, s_Ct, s_zb, s_zt, s_yb, s_yt, s_dzt,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DHT: tl.constexpr,
    HAS_RESET: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    sb = tl.program_id(1)
    n_sb = tl.num_programs(1)
    n = tl.arange(0, BLOCK_N)
    tt = tl.arange(0, BLOCK_T)
    nm = n < N
    n_chunks = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t = c * BLOCK_T + tt
        tm = t < T
        tn = t + 1
        tnm = tn < T
        ntm = tm[:, None] & nm[None, :]
        Bt = tl.load(B_ptr + b * s_Bb + t[:, None] * s_Bt + n[None, :], mask=ntm, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + b * s_Cb + t[:, None] * s_Ct + n[None, :], mask=ntm, other=0.0).to(tl.float32)
        acc_dB = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        acc_dC = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        if HAS_RESET:  # decays of zero at documents' first steps, this one's and the next one's
            starts = _starts(r_ptr, b, t, T)[:, None, None]
            starts_next = _starts(r_ptr, b, tn, T)[:, None, None]
        for s in range(0, N_SUB):
            e = (sb * N_SUB + s) * BLOCK_E + tl.arange(0, BLOCK_E)
            em = e < E
            en = em[:, None] & nm[None, :]
            en_offs = e[:, None] * N + n[None, :]
            m = tm[:, None] & em[None, :]
            mn = tnm[:, None] & em[None, :]
            A = tl.load(A_ptr + en_offs, mask=en, other=0.0).to(tl.float32)
            h0 = tl.load(carry_ptr + (b * n_chunks + c) * E * N + e[:, None] + n[None, :] * E, mask=en, other=0.0)
            if HAS_RESET:  # as in the forward: a where, the carry may be anything
                h0 = tl.where(_starts(r_ptr, b, c * BLOCK_T, T), 0.0, h0)
            if i == 0:
                if HAS_DHT:
                    g_next = tl.load(dhT_ptr + b * E * N + en_offs, mask=en, other=0.0).to(tl.float32)
                else:
                    g_next = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
            else:
                g_next = tl.load(g_ptr + b * E * N + en_offs, mask=en, other=0.0)
            uu = tl.load(u_ptr + b * s_ub + t[:, None] * s_ut + e[None, :], mask=m, other=0.0).to(tl.float32)
            raw = tl.load(dl_ptr + b * s_db + t[:, None] * s_dt + e[None, :], mask=m, other=0.0).to(tl.float32)
            raw_next = tl.load(dl_ptr + b * s_db + tn[:, None] * s_dt + e[None, :], mask=mn, other=0.0).to(tl.float32)
            dyy = tl.load(dy_ptr + b * s_yb + t[:, None] * s_yt + e[None, :], mask=m, other=0.0).to(tl.float32)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32)
                raw += bias[None, :]
                raw_next += bias[None, :]
            dt = tl.where(m, _softplus(raw), 0.0)
            dt_next = tl.where(mn, _softplus(raw_next), 0.0)
            decay = tl.exp(dt[:, :, None] * A[None, :, :])  # [T, E, N]
            decay_next = tl.exp(dt_next[:, :, None] * A[None, :, :])  # a_{t+1}
            if HAS_RESET:
                decay = tl.where(starts, 0.0, decay)
                decay_next = tl.where(starts_next, 0.0, decay_next)
            dtu = dt * uu
            inputs = dtu[:, :, None] * Bt[:, None, :]
            cum, hs = tl.associative_scan((decay, inputs), axis=0, combine_fn=_combine)
            hs += cum * h0[None, :, :]
            if HAS_D:
                Dv = tl.load(D_ptr + e, mask=em, other=0.0).to(tl.float32)
            if HAS_Z:
                zz = tl.load(z_ptr + b * s_zb + t[:, None] * s_zt + e[None, :], mask=m, other=0.0).to(tl.float32)
                y_pre = tl.sum(hs * Ct[:, None, :], axis=2)
                if HAS_D:
                    y_pre += Dv[None, :] * uu
                sig = tl.sigmoid(zz)
                dz = dyy * y_pre * sig * (1.0 + zz * (1.0 - sig))
                tl.store(dz_ptr + (b * T + t[:, None]) * s_dzt + e[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m)
                dyy = dyy * zz * sig
            # g_t = dy'_t C_t + a_{t+1} g_{t+1}; the chunk's last step takes g of the next chunk's first.
            cc = dyy[:, :, None] * Ct[:, None, :]
            cc += tl.where((tt == BLOCK_T - 1)[:, None, None], decay_next * g_next[None, :, :], 0.0)
            _, g = tl.associative_scan((decay_next, cc), axis=0, combine_fn=_combine, reverse=True)
            first = (tt == 0)[:, None, None]
            tl.store(g_ptr + b * E * N + en_offs, tl.sum(tl.where(first, g, 0.0), axis=0), mask=en)
            if c == 0:
                tl.store(dh0_ptr + b * E * N + en_offs, tl.sum(tl.where(first, decay * g, 0.0), axis=0), mask=en)
            acc_dC += tl.sum(dyy[:, :, None] * hs, axis=1)
            acc_dB += tl.sum(g * dtu[:, :, None], axis=1)
            d_dtu = tl.sum(g * Bt[:, None, :], axis=2)
            g_ah = g * (hs - inputs)  # a_t h_{t-1} = h_t - b_t: no shifted state needed
            ddt = d_dtu * uu + tl.sum(g_ah * A[None, :, :], axis=2)
            dA = tl.sum(g_ah * dt[:, :, None], axis=0)
            du = d_dtu * dt
            if HAS_D:
                du += dyy * Dv[None, :]
                dD = tl.sum(dyy * uu, axis=0)
                tl.store(dD_ptr + b * E + e, tl.load(dD_ptr + b * E + e, mask=em, other=0.0) + dD, mask=em)
            ddl = tl.where(m, ddt * tl.sigmoid(raw), 0.0)
            if HAS_BIAS:
                db = tl.sum(ddl, axis=0)
                tl.store(dbias_ptr + b * E + e, tl.load(dbias_ptr + b * E + e, mask=em, other=0.0) + db, mask=em)
            dA_offs = dA_ptr + b * E * N + en_offs
            tl.store(dA_offs, tl.load(dA_offs, mask=en, other=0.0) + dA, mask=en)
            tl.store(du_ptr + (b * T + t[:, None]) * E + e[None, :], du.to(du_ptr.dtype.element_ty), mask=m)
            tl.store(ddl_ptr + (b * T + t[:, None]) * E + e[None, :], ddl.to(ddl_ptr.dtype.element_ty), mask=m)
        part = (b * n_sb + sb) * T * N + t[:, None] * N + n[None, :]
        tl.store(dB_ptr + part, acc_dB, mask=ntm)
        tl.store(dC_ptr + part, acc_dC, mask=ntm)


@triton.jit
def _scan_step_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, r_ptr, h_ptr, y_ptr,
    E, N, s_ub, s_db, s_Bb, s_Cb, s_zb,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESET: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One time step, the state updated in place: decode reads and writes each state value once. A
    row whose document starts at this token steps from a zero state."""
    b = tl.program_id(0)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    em, nm = e < E, n < N
    en = em[:, None] & nm[None, :]
    h_offs = h_ptr + b * E * N + e[:, None] * N + n[None, :]
    h = tl.load(h_offs, mask=en, other=0.0)
    if HAS_RESET:
        h = tl.where(_starts(r_ptr, b, 0, 1), 0.0, h)
    A = tl.load(A_ptr + e[:, None] * N + n[None, :], mask=en, other=0.0).to(tl.float32)
    uu = tl.load(u_ptr + b * s_ub + e, mask=em, other=0.0).to(tl.float32)
    dt = tl.load(dl_ptr + b * s_db + e, mask=em, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32)
    dt = _softplus(dt)
    Bv = tl.load(B_ptr + b * s_Bb + n, mask=nm, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_Cb + n, mask=nm, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * uu)[:, None] * Bv[None, :]
    tl.store(h_offs, h, mask=en)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + e, mask=em, other=0.0).to(tl.float32) * uu
    if HAS_Z:
        zz = tl.load(z_ptr + b * s_zb + e, mask=em, other=0.0).to(tl.float32)
        y *= zz * tl.sigmoid(zz)
    tl.store(y_ptr + b * E + e, y.to(y_ptr.dtype.element_ty), mask=em)


# ----------------------------------------------------------------------------- launchers


@tuning.register("scan")
@dataclass(frozen=True)
class ScanTuning(tuning.Tuning):
    """The scan's tiles and its choice of kernels (`tuning.tuned(scan=...)`). Measured with
    benchmarks/bench_scan.py --sweep and --sweep-segments (see benchmarks/RESULTS.md)."""

    block_t: int = 16
    """Steps per chunk of the chunked kernels, forward and backward: the forward saves one carried
    state per chunk for the backward. H100, --sweep with SWEEP_TILES=1."""
    fwd_tile: tuple[int, int] = (16, 4)
    """The chunked forward's (channels per tile for N=16, warps). H100, as block_t."""
    bwd_tile: tuple[int, int] = (32, 8)
    """The chunked backward's (channels per tile for N=16, warps). H100, as block_t."""
    sequential_forward: tuple[int, int] = (32, 1)
    """The step-at-a-time kernels' (channels per program, warps), forward and backward: one warp per
    32 channels, which the backward's PTX warp sums need (other shapes sum with `tl.sum`)."""
    sequential_steps: int = 2
    """Steps per loop iteration of the step-at-a-time forward: 2 keeps two steps of loads in flight."""
    sequential_min_programs_per_sm: float = 1.5
    """A training forward and its backward run step at a time once rows x channel blocks reach this
    many programs per SM (0: always; 10**9: never). H200, L=4096, N=16, forward+backward, step at a
    time against chunked (the sweep of benchmarks/bench_scan.py --sweep-paths): 1.0 program per SM (B1 E4096) 6.83
    against 6.26 ms; 1.9 (B2 E4096) 7.08 against 11.50; 3.9 (B8 E2048, mamba-432m) 7.54 against
    22.79; 5.8 (B8 E3072) 8.57 against 33.80. The chunked backward grows with the rows, the step at a
    time one hardly (its time is the walk's latency)."""
    segment_below_programs_per_sm: float = 4
    """An inference forward with fewer programs per SM than this splits time into segments (below)."""
    sequential_backward: bool = True
    """The step-at-a-time backward after a step-at-a-time forward; off: the chunked one (tests, sweep)."""
    sequential_carry_t: int = 8
    """Steps between saved states when both step-at-a-time kernels run: the backward's scratch (8 x N
    x 32 fp32 and dt, 17 KB per program) then stays in L2. H100, B=8 L=4096, kernels alone: fwd+bwd 8.15 ms
    against 9.87 ms with 16 steps, for twice the carries memory (4 N E bytes per 8 steps: 1.07 GB per
    layer there)."""
    sequential_segment_programs_per_sm: int = 32
    """Inference with too few rows to fill the GPU step by step: time splits into segments walked in
    parallel, twice (end states from zero, then the walk from the combined states), until rows x
    channel blocks x segments reach this many programs per SM. H200, B=1, E=4096, --sweep-segments:
    L=4096 0.360 ms (33 segments) against 0.387 with 8 programs per SM and 1.59 in one walk; L=16384
    1.22 ms against 1.43 and 6.31."""
    sequential_min_segment: int = 64
    """Steps a time segment keeps at least (the same sweep)."""
    forward_segment_programs_per_sm_above: tuple[float, int] = (4.0, 8)
    """(rows x channel blocks per SM, target): from that many programs per SM, a training forward
    that splits time aims its segments at this many programs per SM, not `sequential_segment_programs_per_sm`.
    H200, bf16, L=4096, the forward saving its carries (median ms): B8 E3072 (5.8 programs per SM) 8 / 12
    / 16 / 24 / 32 / 48 programs per SM 1.667 / 1.947 / 1.947 / 1.892 / 1.754 / 1.864 (2, 3, 3, 5, 6, 9
    segments), forward+backward 6.845 against 6.950 at 32; B1 E4096 0.388 against 0.379 and B2 E4096
    0.681 against 0.666 at 32, hence 32 below."""
    training_segment_below_programs_per_sm: float = 6.5
    """A training forward and its step-at-a-time backward with fewer programs per SM than this split
    time into segments too (0: never; then the chunked kernels take few rows). The forward's segments
    are the inference ones (fewer with many rows: `forward_segment_programs_per_sm_above`), saving
    their carries; the backward's are below. The sweep below: segments win up to 5.8 programs per SM
    (B8 E3072, samba-421m: 7.75 against 8.15 ms; B6 E4096 7.74 against 8.10), one walk at 7.8."""
    backward_segment_programs_per_sm: int = 32
    """The backward's time segments, until rows x channel blocks x segments reach this many programs
    per SM (or `backward_segment_programs_per_sm_above`'s). H200, L=4096, forward+backward,
    bench_scan.py --sweep-training-segments, 4 / 8 / 16 / 32 programs per SM against one walk: B1
    E4096 2.03 / 1.93 / 2.07 / 1.59 ms against 6.68 (chunked 6.17); B2 E4096 3.40 / 3.46 / 3.00 / 2.74
    against 6.87; B4 E4096 and B8 E2048 (3.9 programs per SM) 5.46 / 5.93 / 5.38 / 5.24 against 7.24;
    B8 E3072 (5.8) 8.04 / 8.83 / 8.54 / 7.75 against 8.15; B8 E4096 (7.8, above the threshold) 9.13 /
    9.95 / 9.64 / 9.80 against 8.62. With the L2 prefetches and dt in the scratch (H200, 2026-12-03,
    bench_scan's fwd_bwd under do_bench): B8 E3072 16 / 32 / 64 7.90 / 7.25 / 6.92 ms, one walk 7.66
    (one call), and in a later call 32 / 64 7.25 / 6.97 at B8 E3072 but 1.78 / 2.18 at B1 E4096: hence
    the target below for many rows."""
    backward_segment_programs_per_sm_above: tuple[float, int] = (4.0, 64)
    """(rows x channel blocks per SM, target): from that many programs per SM (samba-421m's B8 E3072
    has 5.8), the backward's segments aim at this many programs per SM instead; the measurements
    above. Below it (B1, B2, B4 at d_inner 4096) the target stays where it was measured best."""
    prefetch_steps: int = 8
    """How many steps ahead the step-at-a-time kernels ask L2 for their per-channel inputs (0: never):
    the forward and the backward's PASS 1 that many steps ahead, the backward one carry segment
    ahead (its states' recompute reads u and delta first, and would wait on DRAM: Nsight Compute,
    H200, B8 E3072, a third of the backward's stalls were such waits)."""
    training_max_registers: tuple[int, int] = (0, 0)
    """Registers per thread the step-at-a-time training kernels may use, (forward, backward); 0: the
    compiler's choice. Fewer registers would let more one-warp programs share an SM, and these kernels
    are bound by latency (H200 Nsight Compute, B8 E3072: the backward at 239 registers holds 8 programs
    per SM, 1.9 warps per scheduler, and issues on 47% of cycles). Measured, no cap pays: bench_scan.py
    --sweep-occupancy (H200, 2026-12-02) at 168 gives the backward within noise of the compiler's
    choice at every shape and segment count, and 128 spills (B8 E3072 one walk: 9.54 ms against 6.34)."""


def _config(t: ScanTuning, E: int, N: int, which: str = "fwd"):
    """(BLOCK_E, BLOCK_N, BLOCK_T, num_warps): a [BLOCK_E, BLOCK_N, BLOCK_T] fp32 tile."""
    block_n = triton.next_power_of_2(N)
    block_e, warps = t.fwd_tile if which == "fwd" else t.bwd_tile
    block_e = max(1, min(triton.next_power_of_2(E), block_e * 16 // block_n))
    return block_e, block_n, t.block_t, warps


def resets(reset, fallback):
    """reset [B, T] bool as the kernels read it (bytes, rows contiguous), or a dummy pointer (HAS_RESET
    off: the kernels never read it)."""
    return reset.contiguous().view(torch.uint8) if reset is not None else fallback


def scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, save_carries: bool, reset=None):
    batch, T, E = u.shape
    N = A.shape[1]
    u, delta, B, C = (row_stride(x) for x in (u, delta, B, C))
    z = row_stride(z) if z is not None else None
    t = tuning.current("scan")
    block_e, block_n, block_t, warps = _config(t, E, N)
    segments = _segments(t, batch, E, T, u.device, training=save_carries)
    sequential = _sequential(t, batch, E, u.device) or segments > 1
    carry_t = _carry_steps(t, batch, E, N, T, u.device) if save_carries else t.sequential_carry_t
    y, final_out, carries = _forward_outputs(t, u, A, save_carries)
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                 HAS_H0=initial_state is not None, HAS_RESET=reset is not None, SAVE_CARRIES=save_carries,
                 BLOCK_N=block_n)
    seq_e, seq_warps = t.sequential_forward
    if sequential:  # states [N, E]-major (channels contiguous), B and C in fp32 (no per-thread conversions)
        A, B, C = A.t(), B.float(), C.float()
        initial_state = initial_state.transpose(1, 2) if initial_state is not None else None
    final = torch.empty(batch, N, E, device=u.device, dtype=torch.float32) if sequential else final_out
    dummy = final
    args = (u, delta, A.contiguous(), B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            initial_state.contiguous() if initial_state is not None else dummy, resets(reset, dummy), y, final,
            carries)
    strides = (T, E, N, u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1),
               C.stride(0), C.stride(1), z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0)
    if sequential:
        # Segments of a whole number of carry steps; the last one may be shorter.
        seg = triton.cdiv(triton.cdiv(T, segments), carry_t) * carry_t
        segments = triton.cdiv(T, seg)
        ends = torch.empty(batch, segments, N, E, device=u.device, dtype=torch.float32)
        dts = torch.empty(batch, segments, E, device=u.device, dtype=torch.float32)
        launch = dict(BLOCK_E=seq_e, CARRY_T=carry_t, STEPS=t.sequential_steps, num_warps=seq_warps,
                      PREFETCH=_prefetch_steps(t),
                      **_max_registers(t.training_max_registers[0] if save_carries else 0))
        tail = (B.stride(2), C.stride(2), 0, seg, segments)
        programs = (batch, triton.cdiv(E, seq_e))
        if segments > 1:  # PASS 1's states start from zero: none of them is a carry
            _scan_fwd_seq_kernel[(*programs, segments - 1)](*args, ends, dts, *strides, *tail,
                                                            **{**flags, "SAVE_CARRIES": False}, PASS=1, **launch)
        _scan_fwd_seq_kernel[(*programs, segments)](*args, ends, dts, *strides, *tail, **flags,
                                                    PASS=2 if segments > 1 else 0, **launch)
        final = final_out.copy_(final.transpose(1, 2))
    else:
        _scan_fwd_kernel[(batch, triton.cdiv(E, block_e))](
            *args, *strides, **flags, BLOCK_E=block_e, BLOCK_T=block_t, num_warps=warps)
    return y, final, carries


def _prefetch_steps(t: ScanTuning) -> int:
    """The tuning's prefetch distance, or 0 in the interpreter (which runs no PTX)."""
    return 0 if interpreting() else t.prefetch_steps


def _max_registers(n: int) -> dict:
    """The launch option capping a kernel's registers per thread at n (none for 0, or in the interpreter)."""
    return dict(maxnreg=n) if n and not interpreting() else {}


def _forward_outputs(t: ScanTuning, u, A, save_carries: bool):
    """y [B, T, E] in u's dtype, the final state [B, E, N] and, for a backward, the states saved every
    `_carry_steps` steps [B, chunks, N, E] (fp32): the launcher's outputs, and the fake's."""
    batch, T, E = u.shape
    N = A.shape[1]
    chunks = triton.cdiv(T, _carry_steps(t, batch, E, N, T, u.device)) if save_carries else 0
    return (u.new_empty(batch, T, E), u.new_empty(batch, E, N, dtype=torch.float32),
            u.new_empty(batch, chunks, N, E, dtype=torch.float32))


def _carry_steps(t: ScanTuning, batch: int, E: int, N: int, T: int, device) -> int:
    """Steps between the states a training forward saves: what its backward recomputes from."""
    if _sequential_backward(t, batch, E, T, device):
        return t.sequential_carry_t
    return _config(t, E, N)[2]


def _sequential_backward(t: ScanTuning, batch: int, E: int, T: int, device) -> bool:
    """Whether a training forward runs step at a time and its backward too, in one walk or in segments."""
    return t.sequential_backward and (_sequential(t, batch, E, device)
                                      or _segments(t, batch, E, T, device, training=True) > 1)


def _segments(t: ScanTuning, batch: int, E: int, T: int, device, training: bool = False,
              backward: bool = False) -> int:
    """Time segments for a forward (inference, or training: `training`) or for a training backward:
    1 when rows x channel blocks fill the GPU already."""
    programs = batch * triton.cdiv(E, t.sequential_forward[0])
    sms = multiprocessors(device)
    below = t.training_segment_below_programs_per_sm if training else t.segment_below_programs_per_sm
    if programs >= below * sms or (training and not t.sequential_backward):
        return 1
    target = t.backward_segment_programs_per_sm if backward else t.sequential_segment_programs_per_sm
    if training:
        many, target_many = (t.backward_segment_programs_per_sm_above if backward
                             else t.forward_segment_programs_per_sm_above)
        target = target_many if programs >= many * sms else target
    return max(1, min(triton.cdiv(target * sms, programs), T // t.sequential_min_segment))


def _sequential(t: ScanTuning, batch: int, E: int, device) -> bool:
    """Whether the step-at-a-time kernels have enough programs to fill the GPU."""
    return batch * triton.cdiv(E, t.sequential_forward[0]) >= t.sequential_min_programs_per_sm * multiprocessors(device)


def _superblocks(batch: int, E: int, block_e: int, device) -> tuple[int, int]:
    """(channel blocks per backward program, programs per row): enough programs to fill the GPU."""
    blocks = triton.cdiv(E, block_e)
    sms = multiprocessors(device)
    programs = min(blocks, max(1, triton.cdiv(8 * sms, batch)))
    n_sub = triton.cdiv(blocks, programs)
    return n_sub, triton.cdiv(blocks, n_sub)


def backward_path(batch: int, T: int, E: int, N: int, device) -> tuple[int, bool]:
    """What a training forward under the current tuning leaves its backward: the steps between its
    saved states, and whether the backward runs step at a time (else chunked)."""
    t = tuning.current("scan")
    return _carry_steps(t, batch, E, N, T, device), _sequential_backward(t, batch, E, T, device)


def scan_backward(dy, d_final, u, delta, A, B, C, D, z, delta_bias, carries, reset=None, path=None, dz_out=None):
    """The gradients. `path`: the forward's `backward_path` (what autograd passes, since a backward may
    run where the forward's tuning is not seen); None: the current tuning's, which must agree with the
    states saved. Tiles come from the current tuning either way. dz_out: where dz goes, z's shape with
    rows of any stride (the z half of in_proj's gradient, say); a new tensor when None."""
    batch, T, E = u.shape
    N = A.shape[1]
    u, delta, B, C, dy = (row_stride(x) for x in (u, delta, B, C, dy))
    z = row_stride(z) if z is not None else None
    t = tuning.current("scan")
    carry_t, sequential = path if path is not None else backward_path(batch, T, E, N, u.device)
    if carries.shape[1] != triton.cdiv(T, carry_t):  # a wrong spacing would read the wrong states
        raise RuntimeError(f"selective_scan backward: the forward saved {carries.shape[1]} states for {T} steps, "
                           f"the scan's tuning now says one every {carry_t}: run it under its forward's tuning")
    block_e, block_n, block_t, warps = _config(t, E, N, "bwd")
    seq_e, seq_warps = t.sequential_forward
    segments = 1
    if sequential:  # as in the forward: [N, E]-major states, fp32 B and C
        n_sub, n_sb = 1, triton.cdiv(E, seq_e)
        A, B, C = A.t(), B.float(), C.float()
        d_final = d_final.transpose(1, 2) if d_final is not None else None
    else:
        n_sub, n_sb = _superblocks(batch, E, block_e, u.device)
    f32 = dict(device=u.device, dtype=torch.float32)
    du = torch.empty(u.shape, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(delta.shape, device=u.device, dtype=delta.dtype)
    dz = output_rows(dz_out, z) if z is not None else None
    if sequential:  # time segments of whole carry segments; their partial sums are added up below
        carry_segments = triton.cdiv(T, carry_t)
        per_segment = triton.cdiv(carry_segments, _segments(t, batch, E, T, u.device, training=True, backward=True))
        segments = triton.cdiv(carry_segments, per_segment)
    dA = torch.zeros(batch * segments, *A.shape, **f32)
    dD = torch.zeros(batch * segments, E, **f32)
    dbias = torch.zeros(batch * segments, E, **f32)
    dB = torch.empty(batch, n_sb, T, N, **f32)
    dC = torch.empty(batch, n_sb, T, N, **f32)
    dh0 = torch.empty(batch, *A.shape, **f32)
    dummy = dh0
    args = (u, delta, A.contiguous(), B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, resets(reset, dummy), carries, dy,
            d_final.contiguous() if d_final is not None else dummy,
            du, ddelta, dz if dz is not None else dummy, dA, dD, dbias, dB, dC, dh0)
    strides = (u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1),
               C.stride(0), C.stride(1), z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
               dy.stride(0), dy.stride(1), dz.stride(1) if dz is not None else 0)
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                 HAS_DHT=d_final is not None, HAS_RESET=reset is not None, BLOCK_N=block_n)
    if sequential:
        scratch = torch.empty(batch * segments, n_sb, carry_t, block_n + 1, seq_e, **f32)  # a carry segment's states, dt
        qs = torch.empty(batch, segments, N, E, **f32)  # PASS 1: each segment's state gradient, and sum of dt
        dts = torch.empty(batch, segments, E, **f32)
        tile = dict(BLOCK_E=seq_e, num_warps=seq_warps, **_max_registers(t.training_max_registers[1]))
        if segments > 1:
            _scan_bwd_seq_q_kernel[(batch, n_sb, segments - 1)](
                delta, A.contiguous(), C, z if z is not None else dummy,
                delta_bias if delta_bias is not None else dummy, resets(reset, dummy), dy, qs, dts, T, E, N,
                delta.stride(0), delta.stride(1), C.stride(0), C.stride(1), C.stride(2), strides[8], strides[9],
                dy.stride(0), dy.stride(1), 0, per_segment * carry_t, segments, HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None, HAS_RESET=reset is not None, BLOCK_N=block_n,
                PREFETCH=_prefetch_steps(t), **tile)
        warp_sums = block_n == 16 and seq_e == 32 and seq_warps == 1 and not interpreting()
        _scan_bwd_seq_kernel[(batch, n_sb, segments)](
            *args, scratch, qs, dts, T, E, N, *strides, B.stride(2), C.stride(2), 0, per_segment, segments,
            **flags, CARRY_T=carry_t, WARP_SUMS=warp_sums, PREFETCH=int(_prefetch_steps(t) > 0), **tile)
        dA, dh0 = dA.transpose(1, 2).contiguous(), dh0.transpose(1, 2).contiguous()
    else:
        g = torch.empty(batch, E, N, **f32)  # the reverse scan's carry between chunks
        _scan_bwd_kernel[(batch, n_sb)](*args, g, T, E, N, n_sub, *strides, **flags,
                                        BLOCK_E=block_e, BLOCK_T=block_t, num_warps=warps)
    return du, ddelta, dA.sum(0), dB.sum(1), dC.sum(1), dD.sum(0), dz, dbias.sum(0), dh0


# ----------------------------------------------------------------------------- registration

@torch.library.custom_op("samba_lm::selective_scan_fwd", mutates_args=())
def _scan_fwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                 initial_state: torch.Tensor | None, reset: torch.Tensor | None,
                 save_carries: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, save_carries, reset)


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, reset, save_carries):
    return _forward_outputs(tuning.current("scan"), u, A, save_carries)


@torch.library.custom_op("samba_lm::selective_scan_bwd", mutates_args=())
def _scan_bwd_op(dy: torch.Tensor, d_final: torch.Tensor | None, u: torch.Tensor, delta: torch.Tensor,
                 A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
                 delta_bias: torch.Tensor | None, carries: torch.Tensor, reset: torch.Tensor | None,
                 carry_steps: int, sequential: bool) -> list[torch.Tensor]:
    grads = scan_backward(dy, d_final, u, delta, A, B, C, D, z, delta_bias, carries, reset, (carry_steps, sequential))
    return [g if g is not None else u.new_empty(0) for g in grads]


@_scan_bwd_op.register_fake
def _(dy, d_final, u, delta, A, B, C, D, z, delta_bias, carries, reset, carry_steps, sequential):
    f32 = dict(dtype=torch.float32)
    E, N = A.shape
    return [torch.empty_like(u), torch.empty_like(delta), A.new_empty(E, N, **f32), B.new_empty(B.shape, **f32),
            C.new_empty(C.shape, **f32), u.new_empty(E, **f32) if D is not None else u.new_empty(0),
            torch.empty_like(z) if z is not None else u.new_empty(0),
            u.new_empty(E, **f32) if delta_bias is not None else u.new_empty(0), u.new_empty(u.shape[0], E, N, **f32)]


def _setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, reset, _ = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2], reset)
    ctx.h0_dtype = None if initial_state is None else initial_state.dtype
    ctx.tuning = tuning.current("scan")  # for the backward's tiles; see _backward
    batch, T, E = u.shape
    ctx.path = backward_path(batch, T, E, A.shape[1], u.device)  # the carries' spacing, the kernels


def _backward(ctx, dy, d_final, _d_carries):
    u, delta, A, B, C, D, z, delta_bias, carries, reset = ctx.saved_tensors
    if carries.shape[1] == 0 and u.shape[1] > 0:
        raise RuntimeError("samba_lm::selective_scan_fwd ran with save_carries=False (an inference forward): "
                           "it has no backward")
    # The forward's path, as arguments: a backward may run outside the forward's tuning block, or
    # on autograd's CUDA thread, which sees the defaults (a compiled backward: there the tiles too).
    with tuning.tuned(scan=ctx.tuning):
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _scan_bwd_op(
            dy.contiguous(), d_final, u, delta, A, B, C, D, z, delta_bias, carries, reset, *ctx.path)
    return (du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.to(D.dtype) if D is not None else None, dz if z is not None else None,
            dbias.to(delta_bias.dtype) if delta_bias is not None else None,
            dh0.to(ctx.h0_dtype) if ctx.h0_dtype is not None else None, None, None)


torch.library.register_autograd("samba_lm::selective_scan_fwd", _backward, setup_context=_setup)


@torch.library.custom_op("samba_lm::selective_scan_step", mutates_args=("state",))
def _scan_step_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                  state: torch.Tensor, reset: torch.Tensor | None) -> torch.Tensor:
    batch, _, E = u.shape
    N = A.shape[1]
    block_n = triton.next_power_of_2(N)
    block_e = max(1, min(triton.next_power_of_2(E), 2048 // block_n))
    y = torch.empty_like(u)
    dummy = state
    _scan_step_kernel[(batch, triton.cdiv(E, block_e))](
        u, delta, A.contiguous(), B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, resets(reset, dummy), state, y, E, N,
        u.stride(0), delta.stride(0), B.stride(0), C.stride(0), z.stride(0) if z is not None else 0,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_RESET=reset is not None,
        BLOCK_E=block_e, BLOCK_N=block_n, num_warps=4)
    return y


@_scan_step_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, state, reset):
    return torch.empty_like(u)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None, reset=None):
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    if (u.shape[1] == 1 and not needs_grad and initial_state is not None and initial_state.dtype == torch.float32
            and initial_state.is_contiguous() and all(t.stride(-1) == 1 for t in (u, delta, B, C))
            and (z is None or z.stride(-1) == 1)):
        # Decode: one step, the state updated in place and returned (see ops.selective_scan).
        return _scan_step_op(u, delta, A, B, C, D, z, delta_bias, initial_state, reset), initial_state
    y, final, _ = _scan_fwd_op(u, delta, A, B, C, D, z, delta_bias, initial_state, reset, needs_grad)
    return y, final
