"""Attention decode in Triton: one query token per sequence against its key/value cache, split-K
(flash-decoding), the query heads of a group together. Inference only: no gradient.

Layout (shape alphabet of `attention.py`, T = 1): q [B, 1, H, Dh] (or Dh/2: differential queries); k, v [B, 1, Hkv, Dh], the new
token's own key and value at position q_pos [B, 1]; k_prefix, v_prefix [B, P, Hkv, Dh] with
prefix_pos [B, P], the cache in any slot order (a ring buffer; a negative position is an empty slot),
or all three None; q_start [B, 1] or None, the first position of the query's document. Last dims
contiguous (other strides are free); int64 positions.

Two kernels. `_decode_split_kernel`, grid (B, Hkv, SPLITS): a program owns one key/value head and a
slice of the prefix, and runs online softmax (exp2 with log2(e) folded into the scale) for the G =
H/Hkv query heads of the group at once, as the rows of a [16, Dh] tile padded for `tl.dot`. So every
cached key and value is read once, not G times. It writes a partial (max, sum, unnormalised output)
per query head and split, in fp32. `_decode_merge_kernel`, grid (B, H), combines a head's splits by
their maxima (log-sum-exp) together with the own key, which therefore needs no split of its own and
is handled the same with or without a prefix. SPLITS depends on shapes and the GPU only (`_splits`),
so the launch is the same on every step and can be captured in a CUDA graph: splits of at least one
tile are added until B * Hkv * SPLITS reaches 4 programs per SM, at most 128 of them.

`attention_decode_cached` (for `ops.attention_with_cache`) takes the state's positional cache, where
position p sits in slot p mod P: a query at position i can only see slots [0, min(i, P)), so the split
kernel spreads those alone over its splits, read from the query position on the device. A full-attention
cache preallocated for a whole generation is then read only as far as it is filled, at every step of
one captured graph. Its merge kernel then (`append`) writes the new key, value and position into slot
i mod P: the splits have all read the cache by then, and the slot's old key (i - P) may have been
visible. Without `append` the cache is only read (SambaY's cross layers, over their full layer's cache).

Differential queries (`ops.attention`: [B, 1, H, Dh/2], head h against half h mod 2 of its key head,
scale 1/sqrt(Dh/2)), the constexpr HALF: both kernels load a query into the other half's zeros, so a
differential layer's decode step pads nothing (it took three launches a layer as torch ops).

Masking follows the reference: key at p is visible to the query at i when p >= 0 and 0 <= i - p <
window (window 0: no limit), and p >= q_start with documents (HAS_START, a constexpr: none, no cost);
the own key iff i >= 0 (and i >= q_start). Invisible keys are not loaded (empty slots may
hold garbage, NaN included, in a cache allocated with torch.empty); a split that sees nothing keeps
max -inf and sum 0 and weighs 0 in the merge; a query that sees nothing returns zeros.

Memory floor: the cache once, B * P * Hkv * Dh * 2 elements; the partials add B * H * SPLITS *
(Dh + 2) fp32, small next to it while a split holds many keys per query head of its group. H100,
bf16, caches read from HBM: 2.6-2.9 TB/s once there is more than about 50 MB to read (B=64, 18
heads, Dh 128, 2047 keys: 419 us); small reads are bound by latency (B=1, Hkv=4, Dh 64, 2047 keys:
6.1 us). fp32 inputs run tl.dot on CUDA cores, at about 740 GB/s.

Limits: Dh a power of two >= 16 (tl.dot); fp16, bf16, fp32 with all of q, k, v, prefix in one dtype;
fp32 products are exact fp32 (no TF32). The reference covers what this does not: T > 1, gradients,
float64, CPUs (except under TRITON_INTERPRET=1), other head dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import tuning
from ._checks import check_query_width
from .triton_common import interpreting, multiprocessors, row_stride

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """a @ b accumulated in fp32, exactly for fp32 inputs (no TF32). F32 multiplies fp32 copies: the
    interpreter's tl.dot reads bf16 as integers."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _query_dims(h, d, D: tl.constexpr, HALF: tl.constexpr):
    """Where a query head h's values sit along the key dims d: all of them, or (HALF) dims
    [0, D/2) for even h, [D/2, D) for odd; (its offsets, which of d it fills)."""
    shift = D // 2 if HALF else 0
    width = D // 2 if HALF else D
    dq = d - (h % 2) * shift
    return dq, (dq >= 0) & (dq < width)


@triton.jit
def _decode_split_kernel(
    q_ptr, kp_ptr, vp_ptr, pp_ptr, qpos_ptr, qs_ptr, m_ptr, l_ptr, acc_ptr,
    P, keys_per_split, reach, qk_scale,
    s_qb, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_pb, s_qpos, s_qs,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_F32: tl.constexpr,
    POSITIONAL: tl.constexpr, HAS_START: tl.constexpr, HALF: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # the cache may pass 2**31 elements
    hk = tl.program_id(1)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    heads = hk * G + g  # the group's query heads; rows past G are padding for tl.dot
    dq, dm = _query_dims(heads[:, None], d[None, :], D, HALF)
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + dq, mask=(g < G)[:, None] & dm, other=0.0)
    i = tl.load(qpos_ptr + b * s_qpos)
    lowest = 0  # the first visible position: empty slots are negative
    if HAS_START:  # and keys of earlier documents are not seen
        lowest = tl.maximum(tl.load(qs_ptr + b * s_qs), 0)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    if POSITIONAL:  # slot = position mod P: what the query can see lies in [0, min(i, P)), split evenly
        live = tl.minimum(tl.maximum(i, 0), P)
        per_split = tl.cdiv(tl.cdiv(live, BLOCK_N), n_splits) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, live)
    else:
        lo = split * keys_per_split
        hi = tl.minimum(lo + keys_per_split, P)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        pos = tl.load(pp_ptr + b * s_pb + n, mask=n < hi, other=-1)
        dist = i - pos
        seen = (pos >= lowest) & (dist >= 0) & (dist < reach)
        kt = tl.load(kp_ptr + b * s_kb + n[:, None] * s_kn + hk * s_kh + d[None, :], mask=seen[:, None], other=0.0)
        vt = tl.load(vp_ptr + b * s_vb + n[:, None] * s_vn + hk * s_vh + d[None, :], mask=seen[:, None], other=0.0)
        s = _dot(q, tl.trans(kt), DOT_F32) * qk_scale
        s = tl.where(seen[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: keep exp2 off -inf - -inf
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, DOT_F32)
        m = m_new
    rows = (b * G * tl.num_programs(1) + heads) * n_splits + split  # partials are [B, H, SPLITS(, D)]
    tl.store(m_ptr + rows, m, mask=g < G)
    tl.store(l_ptr + rows, l, mask=g < G)
    tl.store(acc_ptr + rows[:, None] * D + d[None, :], acc, mask=(g < G)[:, None])


@triton.jit
def _decode_merge_kernel(
    q_ptr, k_ptr, v_ptr, qpos_ptr, qs_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, kc_ptr, vc_ptr, pc_ptr,
    n_splits, qk_scale, s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_qpos, s_qs, P, s_kcb, s_kcn, s_kch, s_vcb, s_vcn, s_vch,
    s_pcb, G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, APPEND: tl.constexpr, HAS_START: tl.constexpr,
    HALF: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    d = tl.arange(0, D)
    sp = tl.arange(0, BLOCK_S)
    sm = sp < n_splits
    row = (b * H + h) * n_splits + sp
    m_s = tl.load(m_ptr + row, mask=sm, other=float("-inf"))
    l_s = tl.load(l_ptr + row, mask=sm, other=0.0)
    acc_s = tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=sm[:, None], other=0.0)
    # The own key, at the query's position: visible unless the query is padding (or, against the rule
    # q_start <= q_pos, its document begins after it).
    i = tl.load(qpos_ptr + b * s_qpos)
    own = i >= 0
    if HAS_START:
        own = own & (i >= tl.load(qs_ptr + b * s_qs))
    dq, dm = _query_dims(h, d, D, HALF)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + dq, mask=dm, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + b * s_kb + (h // G) * s_kh + d).to(tl.float32)
    v = tl.load(v_ptr + b * s_vb + (h // G) * s_vh + d).to(tl.float32)
    s_own = tl.where(own, tl.sum(q * k, axis=0) * qk_scale, float("-inf"))
    m = tl.maximum(tl.max(m_s, axis=0), s_own)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # nothing visible: every weight below is 0
    w_s = tl.exp2(m_s - m_safe)
    w_own = tl.exp2(s_own - m_safe)
    total = tl.sum(l_s * w_s, axis=0) + w_own
    o = tl.sum(acc_s * w_s[:, None], axis=0) + w_own * v
    o = o / tl.maximum(total, 1.0)  # total >= 1 (the max weighs 1) unless nothing is visible: then o = 0
    tl.store(out_ptr + (b * H + h) * D + d, o.to(out_ptr.dtype.element_ty))
    if APPEND:  # the cache takes the new key once every split has read it: slot = i mod P (i may be < 0)
        slot = ((i % P) + P) % P
        if h % G == 0:
            hk = h // G
            tl.store(kc_ptr + b * s_kcb + slot * s_kcn + hk * s_kch + d, k.to(kc_ptr.dtype.element_ty))
            tl.store(vc_ptr + b * s_vcb + slot * s_vcn + hk * s_vch + d, v.to(vc_ptr.dtype.element_ty))
        if h == 0:
            tl.store(pc_ptr + b * s_pcb + slot, i)


# ----------------------------------------------------------------------------- launcher

LOG2E = 1.4426950408889634


@tuning.register("attention_decode")
@dataclass(frozen=True)
class AttentionDecodeTuning(tuning.Tuning):
    """How the decode kernel splits the cache, and its tiles (`tuning.tuned(attention_decode=...)`).
    Measured on an H100 in bf16, CUDA graphs decoding over enough caches in turn that they come from
    HBM (benchmarks/bench_attention.py --sweep decode)."""

    min_split_blocks: int = 1
    """Tiles of keys per split at least: splits as short as one tile spread small batches over more
    SMs (B=1, Hkv=4, Dh 64, 2047 keys: 6.0 us with 32 splits, 10.2 with splits of 4 tiles)."""
    programs_per_sm: int = 4
    """Splits are added until B * Hkv * SPLITS reaches this many programs per SM."""
    max_splits: int = 128
    """Splits at most (B=1, Hkv=4, 32768 keys: 19 us against 23 with 64; more would crowd the merge's
    registers)."""
    keys_per_tile: int | None = None
    """Keys per tile of the split kernel; None: `_block_n`'s choice by head dim and group."""
    split_warps: int | None = None
    """Warps of the split kernel; None: `_split_warps`'s choice by query heads per key/value head."""
    split_stages: int | None = None
    """Software-pipelining stages of the split kernel's loop over tiles; None: `_split_stages`'s choice."""


def _split_warps(G: int) -> int:
    """Warps of the split kernel: two when several query heads share a key/value head, four for one
    (H100, full window of 2047 keys, B=64, `bench_attention.py --sweep decode`: 16/4 heads x 128 112
    us against 130 with four, 11/1 x 256 69 against 74; 18/18 x 128 444 against 426 with four)."""
    return 4 if G == 1 else 2


def _grouped_128(Dh: int, G: int) -> bool:
    """Groups of query heads over 128-wide keys (SambaY's paired heads: 40/10 x 128), where 64 keys a tile
    in two stages stream fastest (H200, B16, 4096 of 4736 slots: 86 us against 102 with 32 keys in
    Triton's three, the cross layers' reads; the full layer's positional reads 85 against 147)."""
    return Dh == 128 and G > 1


def _block_n(Dh: int, G: int) -> int:
    """Keys per tile: 64 at Dh 64, 32 from Dh 128 (H100: 2890 GB/s against 2650 with 64 keys at B=64,
    18 heads, Dh 128, 2047 keys; 64 keys stay ahead at Dh 64, 16 fall behind at Dh 256); 64 for
    `_grouped_128`."""
    return 64 if _grouped_128(Dh, G) else max(32, min(64, 4096 // Dh))


def _split_stages(Dh: int, G: int) -> int | None:
    return 2 if _grouped_128(Dh, G) else None  # None: Triton's default


def _splits(t: AttentionDecodeTuning, P: int, block_n: int, programs: int, device) -> tuple[int, int]:
    """(keys per split, a multiple of block_n; number of splits) for P cached keys and `programs` =
    B * Hkv: enough programs to fill the GPU, each split at least `min_split_blocks` tiles."""
    blocks = triton.cdiv(P, block_n)
    wanted = triton.cdiv(t.programs_per_sm * multiprocessors(device), programs)
    per_split = max(t.min_split_blocks, triton.cdiv(blocks, wanted), triton.cdiv(blocks, t.max_splits))
    return per_split * block_n, triton.cdiv(blocks, per_split)


def _check(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype):
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"attention_decode: {name} must be {dtype} of shape {tuple(shape)}, got {got}")


def attention_decode(q, k, v, q_pos, window, k_prefix=None, v_prefix=None, prefix_pos=None, q_start=None):
    """One query token per row against its own key and the cache (see the module docstring):
    [B, 1, H, Dh] in q's dtype."""
    _check_all(q, k, v, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start)
    return _decode(q, k, v, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start, cached=False, append=False)


def attention_decode_cached(q, k, v, q_pos, window, k_cache, v_cache, cache_pos, q_start=None, append=True):
    """`attention_decode` over a positional cache (slot = position mod P, as `ops.attention_with_cache`
    documents), which then (`append`) takes the new key, value and position in place, in the merge kernel."""
    _check_all(q, k, v, q_pos, window, k_cache, v_cache, cache_pos, q_start)
    if k_cache is None or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or cache_pos.stride(-1) != 1:
        raise ValueError("attention_decode_cached: the cache (k_cache, v_cache, cache_pos) must be given, "
                         "with its last dims contiguous")
    return _decode(q, k, v, q_pos, window, k_cache, v_cache, cache_pos, q_start, cached=True, append=append)


def _check_all(q, k, v, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start=None):
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"attention_decode: q must have layout [B, 1, H, Dh], got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    batch, _, H, Dq = q.shape
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention_decode: q must be fp16, bf16 or fp32, got {q.dtype}")
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError("attention_decode: k must have layout [B, 1, Hkv, Dh]")
    Hkv, Dh = k.shape[2:]
    if Dh < 16 or Dh & (Dh - 1):
        raise ValueError(f"attention_decode: head dim Dh must be a power of two >= 16, got {Dh}")
    check_query_width("attention_decode", H, Dq, Dh)
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"attention_decode: key/value heads ({Hkv}) must divide query heads ({H})")
    _check("k", k, (batch, 1, Hkv, Dh), q.dtype)
    _check("v", v, (batch, 1, Hkv, Dh), q.dtype)
    _check("q_pos", q_pos, (batch, 1), torch.int64)
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"attention_decode: window must be an int >= 0 (0 = no limit), got {window!r}")
    given = [x is not None for x in (k_prefix, v_prefix, prefix_pos)]
    if any(given) and not all(given):
        raise ValueError("attention_decode: k_prefix, v_prefix and prefix_pos come together (all three or none)")
    if all(given):
        if not isinstance(k_prefix, torch.Tensor) or k_prefix.dim() != 4:
            raise ValueError("attention_decode: k_prefix must have layout [B, P, Hkv, Dh]")
        P = k_prefix.shape[1]
        _check("k_prefix", k_prefix, (batch, P, Hkv, Dh), q.dtype)
        _check("v_prefix", v_prefix, (batch, P, Hkv, Dh), q.dtype)
        _check("prefix_pos", prefix_pos, (batch, P), torch.int64)
    if q_start is not None:
        _check("q_start", q_start, (batch, 1), torch.int64)
    named = dict(k=k, v=v, q_pos=q_pos, k_prefix=k_prefix, v_prefix=v_prefix, prefix_pos=prefix_pos, q_start=q_start)
    for name, t in named.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"attention_decode: {name} is on {t.device}, q on {q.device}")


def decode_output(q, v):
    """The decode ops' output, [B, 1, H, Dh] (Dh the values'), empty: also their fake implementation."""
    return q.new_empty(*q.shape[:3], v.shape[-1])


def _decode(q, k, v, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start, cached: bool, append: bool):
    batch, _, H, Dq = q.shape
    Hkv, Dh = k.shape[2:]
    P = k_prefix.shape[1] if k_prefix is not None else 0
    q, k, v = (row_stride(x) for x in (q, k, v))
    qk_scale = LOG2E / math.sqrt(Dq)  # a differential query's scale is its own width's
    reach = window or 2**63 - 1  # visible distances are < reach; window 0 has no limit
    G = H // Hkv
    f32 = dict(device=q.device, dtype=torch.float32)
    t = tuning.current("attention_decode")
    block_n = t.keys_per_tile or _block_n(Dh, G)
    stages = t.split_stages or _split_stages(Dh, G)
    keys_per_split, n_splits = _splits(t, P, block_n, batch * Hkv, q.device) if P else (0, 0)
    m = torch.empty(batch, H, n_splits, **f32)
    l = torch.empty(batch, H, n_splits, **f32)
    acc = torch.empty(batch, H, n_splits, Dh, **f32)
    qs = q_pos if q_start is None else q_start  # without documents q_pos stands in (unread)
    if n_splits:
        if not cached:  # a cache that is appended to must be the caller's own buffers, never a copy
            k_prefix, v_prefix, prefix_pos = (row_stride(x) for x in (k_prefix, v_prefix, prefix_pos))
        _decode_split_kernel[(batch, Hkv, n_splits)](
            q, k_prefix, v_prefix, prefix_pos, q_pos, qs, m, l, acc, P, keys_per_split, reach, qk_scale,
            q.stride(0), q.stride(2), k_prefix.stride(0), k_prefix.stride(1), k_prefix.stride(2),
            v_prefix.stride(0), v_prefix.stride(1), v_prefix.stride(2), prefix_pos.stride(0), q_pos.stride(0),
            qs.stride(0), G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n, D=Dh,
            DOT_F32=interpreting(), POSITIONAL=cached, HAS_START=q_start is not None, HALF=Dq != Dh,
            num_warps=t.split_warps or _split_warps(G), **({"num_stages": stages} if stages else {}))
    out = decode_output(q, v)
    block_s = triton.next_power_of_2(max(n_splits, 1))
    warps = min(16, max(4, block_s * Dh // 2048))  # the [SPLITS, Dh] fp32 partials: ~64 registers a thread
    append = append and P > 0
    kc, vc, pc = (k_prefix, v_prefix, prefix_pos) if append else (out, out, q_pos)
    _decode_merge_kernel[(batch, H)](
        q, k, v, q_pos, qs, m, l, acc, out, kc, vc, pc, n_splits, qk_scale,
        q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2), q_pos.stride(0), qs.stride(0),
        max(P, 1), *(kc.stride()[:3] if append else (0, 0, 0)), *(vc.stride()[:3] if append else (0, 0, 0)),
        pc.stride(0) if append else 0, G=G, D=Dh, BLOCK_S=block_s, APPEND=append, HAS_START=q_start is not None,
        HALF=Dq != Dh, num_warps=warps)
    return out
