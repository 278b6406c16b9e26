"""Sliding-window (or full) causal flash attention in Triton: forward and backward, grouped-query
heads, a key/value prefix from the state (chunked prefill), any length.

Layout (the shape alphabet of `attention.py`): q [B, T, H, Dh]; k, v [B, T, Hkv, Dh]; the prefix
k_prefix, v_prefix [B, P, Hkv, Dh] with prefix_pos [B, P]; last dims contiguous, other strides free
(views of a fused projection are read in place; a view whose strides are not multiples of 16 bytes is
copied first). fp16 and bf16, and fp32 with 3xTF32 dots (head dims to 128); fp32 accumulation; the
online softmax works in base 2 (scale folded into q).

Loads: the tiles a loop streams (K and V in the forward and the dQ kernel, Q and dO in the dK/dV
kernel) come through tensor descriptors, which Triton lowers to TMA copies on Hopper: no address
arithmetic or masks in registers, zeros past the end of a sequence (H100, one run, B=4, L=4096,
W=2048, 16/4 heads x 128: forward 0.56 -> 0.49 ms, dK/dV kernel 1.05 -> 0.93 ms; 32/4 x 64: 0.66 ->
0.56 and 1.49 -> 1.05 ms). The tiles a program loads once (its own Q, or K and V) come by pointers
(`_tile`).

Which keys a query block visits: the chunk's keys are the queries' own and their positions count up
by one, so the chunk keys a block of queries [i0, i0 + BLOCK_M) can see are the index range
[i0 - W + 1, i0 + BLOCK_M), clipped to the row's first real token (left padding): nothing outside the
window is visited. Only the key blocks that straddle the window's lower edge, the diagonal or the
padding compute a mask; the blocks between run unmasked. The prefix (a ring in any order, empty slots
at negative positions) is masked by its positions and visited only by query blocks that can still see
it (i0 < W - 1), by every block for full attention (W = 0). A state's positional cache
(`attention_with_cache`: slot = position mod P) is visited only below the chunk's first position: a
full-attention cache preallocated for a whole generation costs what is filled.

Packed documents (`q_start`, the constexpr HAS_START; without it the kernels compile to the same
instructions as before): a query's first visible chunk key is the later of its row's first real token
and its document's start, and a prefix key must sit at or after that start. A query block starts at the
key block of the least of its rows' document starts and runs unmasked only from the greatest on; it
skips the prefix when every row's document began inside the chunk. A dK/dV program (key-major) reads
the document starts of the queries in its window, SCAN at a time, for the last query that can see its
keys and the first that cannot see them all: it relies on no order of q_start, any q_start <= q_pos is
exact (a larger one hides every key, the query's own too: zeros, as for padding).

Forward: one program per (query block, batch row x query head); it saves the row's log-sum-exp (base 2)
for the backward. A row that sees no key (left padding) returns zeros and saves +inf, so that the
backward gives it zero probabilities. A one-token call without gradients (decode) goes to
`triton_attention_decode.py`. Every grid is launched heaviest programs first (the last query blocks,
the first key blocks see the most of the window), so that the light ones fill the tail.

Backward: one program per (query block, batch row x query head) computes delta = rowsum(dO * O) and
accumulates dQ over the same key blocks as the forward; then one program per (key block, batch row x
key/value head) accumulates dK and dV over the G = H / Hkv query heads of its group and the query
blocks that see the key block, in one loop over (head, query block) pairs so that loads run ahead
across heads (no atomics: deterministic). Each kernel visits the unmasked blocks in one loop and the
masked ones at both ends of the range in another: fewer loops, fewer live registers.

Differential (half-width) queries, `attention.py`: the decode kernels read them as they are; the
other paths widen them first (`widen_queries`, a few elementwise launches: nothing next to a chunk).

What the reference covers that this does not: float64, CPUs (except under TRITON_INTERPRET=1), head
dims that are not a power of two in [16, 256], fp32 at head dim 256: the public function sends those
to the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import dispatch, tuning
from .attention import attention_reference, cache_append, cache_before, widen_queries
from .triton_attention_decode import attention_decode, attention_decode_cached, decode_output
from .triton_common import interpreting

# ----------------------------------------------------------------------------- kernels

LOG2E = tl.constexpr(1.4426950408889634)
CHUNK_MASK = tl.constexpr(1)  # causal, window, padding and documents from key and query indices
PREFIX_MASK = tl.constexpr(2)  # window, empty slots and documents from the prefix's positions
SCAN = tl.constexpr(512)  # queries a dK/dV program reads at a time to find those a key block's documents reach


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """a @ b (+ acc) in fp32. PRECISION "widen": the interpreter's dot mishandles bf16 operands
    (Triton 3.9), so they are widened to fp32 there."""
    if PRECISION == "widen":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _visible(s, rows, cols, q_pos, k_pos_ptr, first, n_keys, W, MASK: tl.constexpr):
    """s where query `rows` sees key `cols`, -inf elsewhere (MASK 0: every key is visible). `first`, a
    scalar or one per row ([BLOCK_M, 1]: documents), is the lowest visible key: a chunk index for
    CHUNK_MASK (the row's first real token), a position for PREFIX_MASK (0: empty slots are negative)."""
    if MASK == CHUNK_MASK:
        d = rows[:, None] - cols[None, :]
        ok = (d >= 0) & ((d < W) | (W == 0)) & (cols[None, :] >= first) & (cols[None, :] < n_keys)
        s = tl.where(ok, s, float("-inf"))
    if MASK == PREFIX_MASK:
        k_pos = tl.load(k_pos_ptr + cols, mask=cols < n_keys, other=-1)
        d = q_pos[:, None] - k_pos[None, :]
        ok = (k_pos[None, :] >= first) & (d >= 0) & ((d < W) | (W == 0))
        s = tl.where(ok, s, float("-inf"))
    return s


@triton.jit
def _rows(desc, b, r0, h, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows [r0, r0 + BLOCK) of head h of batch row b, as [BLOCK, Dh], through a tensor descriptor of a
    [B, T, heads, Dh] tensor: a TMA copy on Hopper and later; rows past the end read as zeros."""
    return desc.load([b, r0, h, 0]).reshape(BLOCK, HEAD_DIM)


@triton.jit
def _tile(ptr, b, r0, h, n_rows, s_b, s_t, s_h, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The same tile by pointers, for tiles loaded once per program: they stay in registers, where
    tl.dot reads them without taking shared-memory bandwidth from the loop's products (H100, 16/4
    heads x 128, B=4, L=4096: the dK/dV kernel took 1.11 ms with K and V through descriptors, 0.92 ms
    by pointers)."""
    rows = r0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    return tl.load(ptr + b * s_b + h * s_h + rows[:, None] * s_t + offs_d[None, :], mask=(rows < n_rows)[:, None],
                   other=0.0)


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_desc, v_desc, b, hk, k_pos_ptr, start, end, rows, q_pos, first, n_keys, W,
                qk_scale, MASK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the key blocks [start, end) of one source (the chunk or the prefix)."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        k = _rows(k_desc, b, n0, hk, BLOCK_N, HEAD_DIM)
        s = _dot(q, tl.trans(k), None, PRECISION) * qk_scale
        s = _visible(s, rows, cols, q_pos, k_pos_ptr, first, n_keys, W, MASK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _rows(v_desc, b, n0, hk, BLOCK_N, HEAD_DIM)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _chunk_ranges(i0, first_lo, first_hi, T, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key block boundaries for queries [i0, i0 + BLOCK_M): masked [start, a), unmasked [a, b),
    masked [b, end). Unmasked blocks lie below the diagonal, inside the window and past the padding
    and the documents' starts. first_lo, first_hi: the least and the greatest of the rows' first
    visible keys (both the row's first real token, without documents)."""
    lo = tl.where(W > 0, tl.maximum(first_lo, i0 - W + 1), first_lo)
    end = tl.minimum(T, i0 + BLOCK_M)
    start = lo // BLOCK_N * BLOCK_N
    full_lo = tl.where(W > 0, tl.maximum(first_hi, i0 + BLOCK_M - W), first_hi)
    full_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    full_hi = (i0 + 1) // BLOCK_N * BLOCK_N
    a = tl.minimum(tl.maximum(full_lo, start), end)
    b = tl.maximum(a, tl.minimum(full_hi, end))
    return start, a, b, end


@triton.jit
def _query_ranges(j0, first, q_end, q_full, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query block boundaries for chunk keys [j0, j0 + BLOCK_N), as `_chunk_ranges` for the backward.
    Queries from q_end on see none of the keys, those from q_full on not all (documents; else both T)."""
    start = j0 // BLOCK_M * BLOCK_M
    end = tl.where(W > 0, tl.minimum(q_end, j0 + BLOCK_N - 1 + W), q_end)
    full_lo = tl.cdiv(j0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    full_end = tl.where(W > 0, tl.minimum(q_full, j0 + W), q_full) // BLOCK_M * BLOCK_M
    full_lo = tl.where(j0 >= first, full_lo, end)  # a key block reaching into the padding is masked
    a = tl.minimum(tl.maximum(full_lo, start), end)
    b = tl.maximum(a, tl.minimum(full_end, end))
    return start, a, b, end


@triton.jit
def _query_block(q_ptr, qpos_ptr, s_qb, s_qt, s_qh, T, H, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """The program's (batch row, query head) and query block: its rows, q tile, positions, and the
    row's first real token (left padding)."""
    i0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M  # the last blocks see the most keys: first
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    rows = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < T
    q = _tile(q_ptr, b, i0, h, T, s_qb, s_qt, s_qh, BLOCK_M, HEAD_DIM)
    q_pos = tl.load(qpos_ptr + b * T + rows, mask=row_ok, other=-1)
    first = tl.maximum(0, -tl.load(qpos_ptr + b * T))
    return b, h, bh, i0, rows, offs_d, row_ok, q, q_pos, first


@triton.jit
def _query_documents(qs_ptr, qpos_ptr, b, T, rows, row_ok, first):
    """Document bounds of a block of queries: each row's first visible chunk key (its document's start
    as a chunk index, at least `first`) and first visible prefix position, both [BLOCK_M, 1]; the least
    and the greatest of the former over the block (key blocks below the least are skipped, those from
    the greatest on need no document mask); whether some row's document began before the chunk (else
    the prefix, which holds earlier positions, is skipped)."""
    base = tl.load(qpos_ptr + b * T)  # the position of chunk index 0
    qs = tl.load(qs_ptr + b * T + rows, mask=row_ok, other=0)
    row_first = tl.maximum(qs - base, first)
    first_lo = tl.min(tl.where(row_ok, row_first, T))
    first_hi = tl.max(tl.where(row_ok, row_first, first))
    before = tl.min(tl.where(row_ok, qs, base)) < base
    return row_first[:, None], qs[:, None], first_lo, first_hi, before


@triton.jit
def _query_reach(qs_ptr, lo, hi, key_first, key_last):
    """Over queries [lo, hi), by their documents' starts q_start: 1 + the last that can see the position
    key_last (q_start <= key_last; lo if none), and the first that cannot see key_first (hi if none).
    Any q_start: it reads them all rather than rely on their order."""
    q_end = tl.cast(lo, tl.int32)
    q_full = tl.cast(hi, tl.int32)
    for r0 in range(lo, hi, SCAN):
        r = r0 + tl.arange(0, SCAN)
        qs = tl.load(qs_ptr + r, mask=r < hi, other=0)
        q_end = tl.maximum(q_end, tl.max(tl.where((r < hi) & (qs <= key_last), r + 1, 0)))
        q_full = tl.minimum(q_full, tl.min(tl.where((r < hi) & (qs > key_first), r, hi)))
    return q_end, q_full


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_desc, v_desc, kp_desc, vp_desc, pp_ptr, qpos_ptr, qs_ptr, out_ptr, lse_ptr, s_qb, s_qt, s_qh, T, P, H, W,
    scale, G: tl.constexpr, HAS_PREFIX: tl.constexpr, POSITIONAL: tl.constexpr, HAS_START: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    b, h, bh, i0, rows, offs_d, row_ok, q, q_pos, first = _query_block(q_ptr, qpos_ptr, s_qb, s_qt, s_qh, T, H,
                                                                       HEAD_DIM, BLOCK_M)
    hk = h // G
    qk_scale = scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first_lo, first_hi, prefix_first = first, first, 0
    sees_prefix = (W == 0) | (i0 < W - 1)
    if HAS_START:
        first, prefix_first, first_lo, first_hi, before = _query_documents(qs_ptr, qpos_ptr, b, T, rows, row_ok, first)
        sees_prefix = sees_prefix & before
    if HAS_PREFIX:
        if sees_prefix:
            live = P
            if POSITIONAL:  # a state's cache, slot = position mod P: what the chunk sees lies below its start
                live = tl.minimum(tl.maximum(tl.load(qpos_ptr + b * T), 0), P)
            # slots from `live` on read as empty: a cache that holds the chunk already (a cross layer's)
            acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, kp_desc, vp_desc, b, hk, pp_ptr + b * P, 0, live, rows,
                                        q_pos, prefix_first, live, W, qk_scale, PREFIX_MASK, BLOCK_N, HEAD_DIM,
                                        PRECISION)
    start, a, c, end = _chunk_ranges(i0, first_lo, first_hi, T, W, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_desc, v_desc, b, hk, qpos_ptr, start, a, rows, q_pos, first, T, W,
                                qk_scale, CHUNK_MASK, BLOCK_N, HEAD_DIM, PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_desc, v_desc, b, hk, qpos_ptr, a, c, rows, q_pos, first, T, W,
                                qk_scale, 0, BLOCK_N, HEAD_DIM, PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_desc, v_desc, b, hk, qpos_ptr, c, end, rows, q_pos, first, T, W,
                                qk_scale, CHUNK_MASK, BLOCK_N, HEAD_DIM, PRECISION)
    seen = l_i > 0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(out_ptr + ((b * T + rows[:, None]) * H + h) * HEAD_DIM + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + bh * T + rows, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf")),
             mask=row_ok)


@triton.jit
def _block_start(j, start, n1, c, BLOCK: tl.constexpr):
    """The j-th block of the ranges [start, start + n1 BLOCK) and then [c, ...): the masked blocks at
    both ends of a row of blocks, visited by one loop."""
    return tl.where(j < n1, start + j * BLOCK, c + (j - n1) * BLOCK)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_desc, do_desc, lse_ptr, delta_ptr, b, h0, start, n1, c, n, cols, q_pos_ptr,
                 qs_ptr, T, first, W, k_pos, qk_scale, G: tl.constexpr, MASK: tl.constexpr, HAS_START: tl.constexpr,
                 BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of one key block from n query blocks (`_block_start`) of each of the G query heads h0 ..
    h0 + G - 1 of its group, as one loop over (head, query block) pairs so that loads run ahead across
    heads. Transposed: scores are [keys, queries]. HAS_START: the masks also read the queries'
    documents' starts (qs_ptr, positions) and compare them with the keys' positions."""
    offs_m = tl.arange(0, BLOCK_M)
    if HAS_START and MASK == CHUNK_MASK:
        base = tl.load(q_pos_ptr)  # the position of chunk index 0
    # For the prefix with documents, n comes from _query_reach's loop, whose maximum starts at 0. Triton
    # 3.6's axis analysis, short of the loop's fixpoint, then folds the pipelined first iteration's
    # `0 // n` as 0 / 0 and the sm_90 compile dies (SIGFPE). The divisor at least 1 changes nothing:
    # with n == 0 the loop never runs.
    div = n
    if HAS_START and MASK == PREFIX_MASK:
        div = tl.maximum(n, 1)
    for it in range(0, G * n):
        g = it // div
        r0 = _block_start(it % div, start, n1, c, BLOCK_M)
        rows = r0 + offs_m
        row_ok = rows < T
        q = _rows(q_desc, b, r0, h0 + g, BLOCK_M, HEAD_DIM)
        do = _rows(do_desc, b, r0, h0 + g, BLOCK_M, HEAD_DIM)
        lse = tl.load(lse_ptr + g * T + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + g * T + rows, mask=row_ok, other=0.0)
        sT = _dot(k, tl.trans(q), None, PRECISION) * qk_scale
        if MASK == CHUNK_MASK:
            lo = first  # the first visible key (index): the row's first real token, or its document's start
            if HAS_START:
                lo = tl.maximum(tl.load(qs_ptr + rows, mask=row_ok, other=0) - base, first)[None, :]
            d = rows[None, :] - cols[:, None]
            ok = (d >= 0) & ((d < W) | (W == 0)) & (cols[:, None] >= lo) & row_ok[None, :]
            sT = tl.where(ok, sT, float("-inf"))
        if MASK == PREFIX_MASK:
            q_pos = tl.load(q_pos_ptr + rows, mask=row_ok, other=-1)
            lo = 0  # the first visible position: empty slots are negative, documents start at q_start >= 0
            if HAS_START:
                lo = tl.load(qs_ptr + rows, mask=row_ok, other=0)[None, :]
            d = q_pos[None, :] - k_pos[:, None]
            ok = (k_pos[:, None] >= lo) & (d >= 0) & ((d < W) | (W == 0))
            sT = tl.where(ok, sT, float("-inf"))
        pT = tl.exp2(sT - lse[None, :])
        dv = _dot(pT.to(do.dtype), do, dv, PRECISION)
        dpT = _dot(v, tl.trans(do), None, PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk, PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_desc, k_ptr, v_ptr, kp_ptr, vp_ptr, pp_ptr, qpos_ptr, qs_ptr, do_desc, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, dkp_ptr, dvp_ptr, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, T, P, H, W, scale, n_prefix_blocks,
    G: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_START: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (key block, batch row x kv head): the first n_prefix_blocks key blocks are the prefix's."""
    pid = tl.program_id(1)  # key blocks in order: the first see the most queries
    bhk = tl.program_id(0)
    Hkv = H // G
    b, hk = bhk // Hkv, bhk % Hkv
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    first = tl.maximum(0, -tl.load(qpos_ptr + b * T))
    qk_scale = scale * LOG2E
    stats = (b * H + hk * G) * T  # lse and delta are [B, H, T]; the group's first query head
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if HAS_PREFIX and pid < n_prefix_blocks:  # compiled only for calls with a prefix
        j0 = pid * BLOCK_N
        cols = j0 + offs_n
        col_ok = cols < P
        k = _tile(kp_ptr, b, j0, hk, P, P * Hkv * HEAD_DIM, Hkv * HEAD_DIM, HEAD_DIM, BLOCK_N, HEAD_DIM)  # contiguous
        v = _tile(vp_ptr, b, j0, hk, P, P * Hkv * HEAD_DIM, Hkv * HEAD_DIM, HEAD_DIM, BLOCK_N, HEAD_DIM)
        k_pos = tl.load(pp_ptr + b * P + cols, mask=col_ok, other=-1)
        reach = tl.where(W > 0, tl.minimum(T, W - 1), T)  # the queries that may see the prefix
        if HAS_START:  # and of those, the queries whose documents began by the block's last key
            reach, _ = _query_reach(qs_ptr + b * T, 0, reach, 0, tl.max(k_pos))
        n = tl.cdiv(reach, BLOCK_M)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_desc, do_desc, lse_ptr + stats, delta_ptr + stats, b, hk * G, 0, n, 0,
                              n, cols, qpos_ptr + b * T, qs_ptr + b * T, T, first, W, k_pos, qk_scale, G, PREFIX_MASK,
                              HAS_START, BLOCK_M, HEAD_DIM, PRECISION)
        out = (b * P + cols[:, None]) * Hkv * HEAD_DIM + hk * HEAD_DIM + offs_d[None, :]
        tl.store(dkp_ptr + out, (dk * scale).to(dkp_ptr.dtype.element_ty), mask=col_ok[:, None])
        tl.store(dvp_ptr + out, dv.to(dvp_ptr.dtype.element_ty), mask=col_ok[:, None])
    else:
        j0 = (pid - n_prefix_blocks) * BLOCK_N
        cols = j0 + offs_n
        col_ok = cols < T
        k = _tile(k_ptr, b, j0, hk, T, s_kb, s_kt, s_kh, BLOCK_N, HEAD_DIM)
        v = _tile(v_ptr, b, j0, hk, T, s_vb, s_vt, s_vh, BLOCK_N, HEAD_DIM)
        q_end, q_full = T, T
        if HAS_START:  # the queries (inside the window) whose documents reach the block's keys
            base = tl.load(qpos_ptr + b * T)
            reach = tl.where(W > 0, tl.minimum(T, j0 + BLOCK_N - 1 + W), T)
            q_end, q_full = _query_reach(qs_ptr + b * T, j0, reach, base + j0, base + tl.minimum(j0 + BLOCK_N, T) - 1)
        start, a, c, end = _query_ranges(j0, first, q_end, q_full, W, BLOCK_M, BLOCK_N)
        n_full = (c - a) // BLOCK_M
        n1 = tl.cdiv(a - start, BLOCK_M)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_desc, do_desc, lse_ptr + stats, delta_ptr + stats, b, hk * G, a, n_full,
                              c, n_full, cols, qpos_ptr + b * T, qs_ptr + b * T, T, first, W, cols, qk_scale, G, 0,
                              HAS_START, BLOCK_M, HEAD_DIM, PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_desc, do_desc, lse_ptr + stats, delta_ptr + stats, b, hk * G, start, n1,
                              c, n1 + tl.cdiv(end - c, BLOCK_M), cols, qpos_ptr + b * T, qs_ptr + b * T, T, first, W,
                              cols, qk_scale, G, CHUNK_MASK, HAS_START, BLOCK_M, HEAD_DIM, PRECISION)
        out = (b * T + cols[:, None]) * Hkv * HEAD_DIM + hk * HEAD_DIM + offs_d[None, :]
        tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
        tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_desc, v_desc, b, hk, k_pos_ptr, start, n1, c, n, rows, q_pos, first, n_keys,
               W, qk_scale, MASK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               PRECISION: tl.constexpr):
    """dQ of one query block from n key blocks (`_block_start`) of one source."""
    offs_n = tl.arange(0, BLOCK_N)
    for j in range(0, n):
        n0 = _block_start(j, start, n1, c, BLOCK_N)
        cols = n0 + offs_n
        k = _rows(k_desc, b, n0, hk, BLOCK_N, HEAD_DIM)
        v = _rows(v_desc, b, n0, hk, BLOCK_N, HEAD_DIM)
        s = _dot(q, tl.trans(k), None, PRECISION) * qk_scale
        s = _visible(s, rows, cols, q_pos, k_pos_ptr, first, n_keys, W, MASK)
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), None, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_desc, v_desc, kp_desc, vp_desc, pp_ptr, qpos_ptr, qs_ptr, out_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    s_qb, s_qt, s_qh, T, P, H, W, scale,
    G: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_START: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    b, h, bh, i0, rows, offs_d, row_ok, q, q_pos, first = _query_block(q_ptr, qpos_ptr, s_qb, s_qt, s_qh, T, H,
                                                                       HEAD_DIM, BLOCK_M)
    hk = h // G
    qk_scale = scale * LOG2E
    rows_hd = ((b * T + rows[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]  # dO and O are contiguous
    do = tl.load(do_ptr + rows_hd, mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + bh * T + rows, mask=row_ok, other=float("inf"))
    delta = tl.sum(do.to(tl.float32) * tl.load(out_ptr + rows_hd, mask=row_ok[:, None], other=0.0).to(tl.float32), 1)
    tl.store(delta_ptr + bh * T + rows, delta, mask=row_ok)  # for the dK, dV kernel, which runs next
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first_lo, first_hi, prefix_first = first, first, 0  # as in the forward
    sees_prefix = (W == 0) | (i0 < W - 1)
    if HAS_START:
        first, prefix_first, first_lo, first_hi, before = _query_documents(qs_ptr, qpos_ptr, b, T, rows, row_ok, first)
        sees_prefix = sees_prefix & before
    if HAS_PREFIX:
        if sees_prefix:
            n = tl.cdiv(P, BLOCK_N)
            dq = _dq_blocks(dq, q, do, lse, delta, kp_desc, vp_desc, b, hk, pp_ptr + b * P, 0, n, 0, n, rows, q_pos,
                            prefix_first, P, W, qk_scale, PREFIX_MASK, BLOCK_N, HEAD_DIM, PRECISION)
    start, a, c, end = _chunk_ranges(i0, first_lo, first_hi, T, W, BLOCK_M, BLOCK_N)
    n_full = (c - a) // BLOCK_N
    n1 = tl.cdiv(a - start, BLOCK_N)
    dq = _dq_blocks(dq, q, do, lse, delta, k_desc, v_desc, b, hk, qpos_ptr, a, n_full, c, n_full, rows, q_pos, first,
                    T, W, qk_scale, 0, BLOCK_N, HEAD_DIM, PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, k_desc, v_desc, b, hk, qpos_ptr, start, n1, c,
                    n1 + tl.cdiv(end - c, BLOCK_N), rows, q_pos, first, T, W, qk_scale, CHUNK_MASK, BLOCK_N, HEAD_DIM,
                    PRECISION)
    tl.store(dq_ptr + rows_hd, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------- launchers

Tiles = tuple[int, int, int, int]  # (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages)


@tuning.register("attention")
@dataclass(frozen=True)
class AttentionTuning(tuning.Tuning):
    """The training kernels' tiles by head dim (`tuning.tuned(attention=...)`). H100, B=4, L=4096,
    W=2048, bf16: benchmarks/bench_attention.py --sweep train."""

    fwd_tiles: Mapping[int, Tiles] = tuning.table(
        {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 64, 4, 2), 128: (64, 64, 4, 3), 256: (64, 32, 8, 2)})
    """The forward's; its head dims are those the kernels run (others go to the reference)."""
    dq_tiles: Mapping[int, Tiles] = tuning.table(
        {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (32, 32, 8, 1)})
    """The dQ kernel's, which owns BLOCK_M queries."""
    dkdv_tiles: Mapping[int, Tiles] = tuning.table(
        {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (128, 64, 4, 2), 128: (64, 64, 4, 2), 256: (32, 32, 8, 1)})
    """The dK, dV kernel's, which owns BLOCK_N keys."""
    fp32_tiles: Tiles = (32, 32, 4, 2)
    """Every kernel's for fp32 inputs, at every head dim. On a GPU they run 3xTF32 products (about
    fp32's accuracy, on tensor cores), and the three products per dot crowd the registers: small tiles.
    Exact fp32 dots ran on CUDA cores at under 1 TFLOP/s (H200, 12 heads x 128, 8,192 queries: 132 ms
    a call; now 2.2 ms). Head dim 256 spills even at these tiles: fp32 there goes to the reference."""


def supported(head_dim: int, dtype: torch.dtype) -> bool:
    return head_dim in tuning.current("attention").fwd_tiles and (dtype != torch.float32 or head_dim <= 128)


def _tiles(t: AttentionTuning, table: Mapping[int, Tiles], q: torch.Tensor) -> Tiles:
    return t.fp32_tiles if q.dtype == torch.float32 else table[q.shape[-1]]


def _tma_ready(x: torch.Tensor) -> torch.Tensor:
    """x, or a contiguous copy where a tensor descriptor can't address it: TMA needs the last dim
    contiguous and the base and the other strides in multiples of 16 bytes."""
    size = x.element_size()
    if x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in x.stride()[:-1]):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _descriptor(x: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """A [B, T, heads, Dh] tensor's descriptor for tiles of block_rows rows of one head (`_rows`)."""
    return TensorDescriptor.from_tensor(x, [1, block_rows, 1, x.shape[-1]])


def _strides(*tensors):
    return [s for t in tensors for s in (t.stride(0), t.stride(1), t.stride(2))]


def _prefix_args(k, v, k_prefix, v_prefix, prefix_pos):
    """The prefix's tensors and length; without one, k and v stand in (their descriptors go unused)."""
    if k_prefix is None:
        return k, v, torch.zeros(1, dtype=torch.int32, device=k.device), 0
    return (_tma_ready(k_prefix.contiguous()), _tma_ready(v_prefix.contiguous()),
            prefix_pos.to(torch.int32).contiguous(), k_prefix.shape[1])


def _query_starts(q_start, q_pos_i32):
    """The kernels' q_start: int32, clamped to [0, 2**31) (keys at negative positions are never
    visible, so a start below 0 means 0); without documents, the int32 q_pos stands in (unread)."""
    if q_start is None:
        return q_pos_i32
    return q_start.clamp(0, 2**31 - 1).to(torch.int32).contiguous()


def _precision(dtype) -> str:
    """tl.dot's input precision: 16-bit inputs are exact anyway; fp32 gets 3xTF32 on GPUs. Under
    TRITON_INTERPRET=1, exact fp32 products, and bf16 widened (the interpreter mishandles bf16 dots)."""
    if dtype == torch.bfloat16 and interpreting():
        return "widen"
    if dtype == torch.float32:
        return "ieee" if interpreting() else "tf32x3"
    return "tf32"


def _check_grid(blocks: int, T: int):
    if blocks > 65535:  # the limit of a grid's second dimension
        raise ValueError(f"attention: a chunk of {T} tokens makes {blocks} blocks, more than 65535; pass it in "
                         f"shorter chunks with a state (the result is the same)")


def attention_forward(q, k, v, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start=None,
                      positional: bool = False):
    """(out, lse); `positional`: the prefix is a state's cache (slot = position mod P), read only below
    each row's first position."""
    batch, T, H, Dh = q.shape
    G = H // k.shape[2]
    q, k, v = (_tma_ready(x) for x in (q, k, v))
    kp, vp, pp, P = _prefix_args(k, v, k_prefix, v_prefix, prefix_pos)
    positions = q_pos.to(torch.int32).contiguous()
    out = torch.empty(batch, T, H, Dh, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, H, T, device=q.device, dtype=torch.float32)
    t = tuning.current("attention")
    block_m, block_n, warps, stages = _tiles(t, t.fwd_tiles, q)
    _check_grid(triton.cdiv(T, block_m), T)
    _attn_fwd_kernel[(batch * H, triton.cdiv(T, block_m))](
        q, *(_descriptor(x, block_n) for x in (k, v, kp, vp)), pp, positions, _query_starts(q_start, positions), out,
        lse, *_strides(q), T, P, H, window, 1.0 / math.sqrt(Dh), G=G, HAS_PREFIX=P > 0, POSITIONAL=positional,
        HAS_START=q_start is not None, HEAD_DIM=Dh, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(q.dtype),
        num_warps=warps, num_stages=stages)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start=None):
    batch, T, H, Dh = q.shape
    Hkv = k.shape[2]
    q, k, v, dout = (_tma_ready(x) for x in (q, k, v, dout.contiguous()))
    kp, vp, pp, P = _prefix_args(k, v, k_prefix, v_prefix, prefix_pos)
    delta = torch.empty_like(lse)  # rowsum(dO * O), written by the dQ kernel
    positions = q_pos.to(torch.int32).contiguous()
    starts = _query_starts(q_start, positions)
    dq = torch.empty(batch, T, H, Dh, device=q.device, dtype=q.dtype)
    dk = torch.empty(batch, T, Hkv, Dh, device=q.device, dtype=k.dtype)
    dv = torch.empty(batch, T, Hkv, Dh, device=q.device, dtype=v.dtype)
    dkp, dvp = (torch.empty_like(kp), torch.empty_like(vp)) if P else (dk, dv)
    common = dict(G=H // Hkv, HEAD_DIM=Dh, PRECISION=_precision(q.dtype), HAS_PREFIX=P > 0,
                  HAS_START=q_start is not None)
    t = tuning.current("attention")
    block_m, block_n, warps, stages = _tiles(t, t.dq_tiles, q)
    _check_grid(triton.cdiv(T, block_m), T)
    _attn_bwd_dq_kernel[(batch * H, triton.cdiv(T, block_m))](
        q, *(_descriptor(x, block_n) for x in (k, v, kp, vp)), pp, positions, starts, out.contiguous(), dout, lse,
        delta, dq, *_strides(q), T, P, H, window, 1.0 / math.sqrt(Dh), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages, **common)
    block_m, block_n, warps, stages = _tiles(t, t.dkdv_tiles, q)
    n_prefix_blocks = triton.cdiv(P, block_n)
    _check_grid(n_prefix_blocks + triton.cdiv(T, block_n), T)
    _attn_bwd_dkdv_kernel[(batch * Hkv, n_prefix_blocks + triton.cdiv(T, block_n))](
        _descriptor(q, block_m), k, v, kp, vp, pp, positions, starts, _descriptor(dout, block_m), lse, delta, dk, dv,
        dkp, dvp, *_strides(k, v), T, P, H, window, 1.0 / math.sqrt(Dh), n_prefix_blocks, BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common)
    return dq, dk, dv, (dkp if P else None), (dvp if P else None)


# ----------------------------------------------------------------------------- registration

@torch.library.custom_op("samba_lm::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, window: int,
                      k_prefix: torch.Tensor | None, v_prefix: torch.Tensor | None, prefix_pos: torch.Tensor | None,
                      q_start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start)


@_attention_fwd_op.register_fake
def _(q, k, v, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start=None):
    batch, T, H, _ = q.shape
    return torch.empty_like(q), q.new_empty(batch, H, T, dtype=torch.float32)


@torch.library.custom_op("samba_lm::attention_bwd", mutates_args=())
def _attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, q_pos: torch.Tensor, window: int, k_prefix: torch.Tensor | None,
                      v_prefix: torch.Tensor | None, prefix_pos: torch.Tensor | None,
                      q_start: torch.Tensor | None = None) -> list[torch.Tensor]:
    grads = attention_backward(dout, q, k, v, out, lse, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start)
    return [g if g is not None else q.new_empty(0) for g in grads]


@_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start=None):
    prefix = [torch.empty_like(k_prefix), torch.empty_like(v_prefix)] if k_prefix is not None else [
        q.new_empty(0), q.new_empty(0)]
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)] + prefix


def _setup(ctx, inputs, output):
    q, k, v, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start = inputs
    ctx.save_for_backward(q, k, v, q_pos, k_prefix, v_prefix, prefix_pos, q_start, *output)
    ctx.window = window
    ctx.tuning = tuning.current("attention")


def _backward(ctx, dout, _dlse):
    q, k, v, q_pos, k_prefix, v_prefix, prefix_pos, q_start, out, lse = ctx.saved_tensors
    with tuning.tuned(attention=ctx.tuning):  # the forward's: autograd's CUDA thread sees the defaults
        dq, dk, dv, dkp, dvp = _attention_bwd_op(dout, q, k, v, out, lse, q_pos, ctx.window, k_prefix, v_prefix,
                                                 prefix_pos, q_start)
    has_prefix = k_prefix is not None
    return dq, dk, dv, None, None, dkp if has_prefix else None, dvp if has_prefix else None, None, None


torch.library.register_autograd("samba_lm::attention_fwd", _backward, setup_context=_setup)


@torch.library.custom_op("samba_lm::attention_decode", mutates_args=())
def _attention_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, window: int,
                         k_prefix: torch.Tensor | None, v_prefix: torch.Tensor | None, prefix_pos: torch.Tensor | None,
                         q_start: torch.Tensor | None = None) -> torch.Tensor:
    return attention_decode(q, k, v, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start)


@_attention_decode_op.register_fake
def _(q, k, v, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start=None):
    return decode_output(q, v)


@torch.library.custom_op("samba_lm::attention_prefill_cached", mutates_args=())
def _attention_prefill_cached_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, window: int,
                                 k_cache: torch.Tensor, v_cache: torch.Tensor, cache_pos: torch.Tensor,
                                 q_start: torch.Tensor | None = None) -> torch.Tensor:
    return attention_forward(q, k, v, q_pos, window, k_cache, v_cache, cache_pos, q_start, positional=True)[0]


@_attention_prefill_cached_op.register_fake
def _(q, k, v, q_pos, window, k_cache, v_cache, cache_pos, q_start=None):
    return torch.empty_like(q)


@torch.library.custom_op("samba_lm::attention_decode_cached", mutates_args=("k_cache", "v_cache", "cache_pos"))
def _attention_decode_cached_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, window: int,
                                k_cache: torch.Tensor, v_cache: torch.Tensor, cache_pos: torch.Tensor,
                                q_start: torch.Tensor | None = None, append: bool = True) -> torch.Tensor:
    return attention_decode_cached(q, k, v, q_pos, window, k_cache, v_cache, cache_pos, q_start, append)


@_attention_decode_cached_op.register_fake
def _(q, k, v, q_pos, window, k_cache, v_cache, cache_pos, q_start=None, append=True):
    return decode_output(q, v)


def attention_with_cache_triton(q, k, v, q_pos, window, k_cache, v_cache, cache_pos, q_start=None, append=True):
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad or not supported(k.shape[-1], q.dtype) or k_cache.shape[1] == 0:
        # Training through a state (or an unsupported shape): the general op over a snapshot of the
        # cache (the part before the chunk), which autograd may keep while the cache is overwritten below.
        out = attention_triton(q, k, v, q_pos, window, k_cache.clone(), v_cache.clone(), cache_before(cache_pos, q_pos),
                               q_start)
    elif q.shape[1] == 1 and k_cache.dtype == q.dtype and all(
            t.stride(-1) == 1 for t in (k_cache, v_cache, cache_pos)):
        return _attention_decode_cached_op(q, k, v, q_pos, window, k_cache, v_cache, cache_pos, q_start, append)
    else:
        out = _attention_prefill_cached_op(_full_width(q, k), k, v, q_pos, window, k_cache.to(k.dtype),
                                           v_cache.to(v.dtype), cache_pos, q_start)
    if append:
        cache_append(k, v, q_pos, k_cache, v_cache, cache_pos)
    return out


def _full_width(q, k):
    """q, or its differential (half-width) queries widened: only the decode kernels read those."""
    return widen_queries(q) if q.shape[-1] != k.shape[-1] else q


def attention_triton(q, k, v, q_pos, window=0, k_prefix=None, v_prefix=None, prefix_pos=None, q_start=None):
    if not supported(k.shape[-1], q.dtype):
        if dispatch.forced() == "triton":  # asked for the kernel: say it cannot, never run something else
            raise RuntimeError(f"kernel backend 'triton' for op 'attention' does not run head_dim {k.shape[-1]} with "
                               f"{q.dtype}: head dims {sorted(tuning.current('attention').fwd_tiles)} "
                               f"(float32: up to 128)")
        return attention_reference(q, k, v, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start)
    if k_prefix is not None and k_prefix.shape[1] == 0:  # an empty cache (full attention's first call)
        k_prefix = v_prefix = prefix_pos = None
    if k_prefix is not None:  # one dtype for the kernel's loads
        k_prefix, v_prefix = k_prefix.to(k.dtype), v_prefix.to(v.dtype)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, k_prefix, v_prefix))
    if q.shape[1] == 1 and not needs_grad:  # decode: the cache split across programs
        return _attention_decode_op(q, k, v, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start)
    return _attention_fwd_op(_full_width(q, k), k, v, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start)[0]
