"""Causal attention of a chunk over itself and an optional key/value prefix: sliding-window or full,
grouped-query heads.

Shapes (B batch, T chunk length, P prefix length, H query heads, Hkv key/value heads dividing H,
Dh head dim):
    q [B, T, H, Dh]   k, v [B, T, Hkv, Dh]   q_pos [B, T] (int64)   out [B, T, H, Dh]
    k_prefix, v_prefix [B, P, Hkv, Dh]   prefix_pos [B, P] (int64)   (optional, all three or none)
    q_start [B, T] (int64, optional)

The chunk's keys k, v sit at the queries' positions q_pos, which count up by one along T (a row may
start negative: left padding). The prefix holds cached keys (a ring buffer of the last W-1 positions,
or every earlier position for full attention) in any order; a negative position marks an empty slot.
A key at position p is visible to a query at position i when p >= 0 and 0 <= i - p < window
(window 0: no limit). A query that sees no key returns zeros. Softmax scale is 1/sqrt(Dh).

Differential queries (SambaY's differential attention, whose key and value heads come in pairs, seen as
one head of 2 x the width): q may be half as wide as the keys, [B, T, H, Dh/2] with H even. Query head
h is then scored against half h mod 2 of its key head (dims [0, Dh/2) for even h, [Dh/2, Dh) for odd),
scale 1/sqrt(Dh/2), and takes the whole value: out is [B, T, H, Dh]. That is the attention of the
queries `widen_queries` pads with zeros on the other half and scales by sqrt 2; a kernel that does not
read half queries itself runs those.

Packed documents: q_start[b, t] is the first position of query t's document; a key at position p
(in the chunk or the prefix) is visible to it only if also p >= q_start[b, t], so a document never
sees an earlier one, through the cache neither. q_pos stays the row's stream position (the window and
the cache slots go by it); RoPE's positions within each document are the caller's. A real query's
document starts at or before it (q_start <= q_pos, checked on CPUs), so it sees at least itself;
padding (q_pos < 0) sees nothing whatever its q_start. None: no documents, the computation as before.

The reference takes queries in blocks against all keys, so it never holds a T x (P + T) matrix.

`attention_with_cache` is the same attention with the prefix being a state's cache, which it then
updates in place: the chunk's keys, values and positions go into slot p mod S (S the cache's slots;
of a chunk longer than S, only its newest S). The cache must be positional, as the state keeps it:
every slot holds the position it is congruent to mod S, or a negative one (empty, padding). Kernels
may rely on that: the keys a query at position i can see lie in slots [0, min(i, S)), so a decode
step over a large preallocated cache reads only what is filled, and a captured step replays at any
length. Of the cache, only the keys at positions before the chunk's first (each row's q_pos[:, 0])
are read; the chunk's own come from k and v. With `append=False` the cache is read so and left as it
is: SambaY's cross layers read their full layer's cache after that layer has stored the chunk in it
(a full-attention cache, which never wraps, so the earlier keys are all still there).
"""

from __future__ import annotations

import math

import torch

from . import dispatch
from ._checks import (check_float, check_positions, check_query_starts, check_query_width, check_rank,
                      compute_dtype)

QUERY_BLOCK = 128


def widen_queries(q):
    """Differential queries [B, T, H, Dh/2] (module docstring) as full-width ones [B, T, H, Dh] that score
    the same: even heads [q | 0], odd [0 | q], scaled by sqrt 2 (the scale 1/sqrt(Dh) is then theirs)."""
    pairs = (q * math.sqrt(2)).unflatten(2, (-1, 2)).transpose(-1, -2)  # [B, T, H/2, Dh/2, half]
    return torch.diag_embed(pairs, dim1=-3, dim2=-2).flatten(2, 3).flatten(-2)  # [.., H/2, half, slot, Dh/2]


def attention_reference(q, k, v, q_pos, window=0, k_prefix=None, v_prefix=None, prefix_pos=None, q_start=None):
    cdt = compute_dtype(q.dtype)
    batch, T, H = q.shape[:3]
    Hkv, Dh = k.shape[2:]
    half = q.shape[-1] != Dh  # differential queries, widened in the compute dtype
    k_pos = q_pos
    if k_prefix is not None:
        k, v, k_pos = (torch.cat([k_prefix.to(k.dtype), k], 1), torch.cat([v_prefix.to(v.dtype), v], 1),
                       torch.cat([prefix_pos, q_pos], 1))
    kf, vf = k.to(cdt), v.to(cdt)
    out = []
    for t0 in range(0, T, QUERY_BLOCK):
        qb = q[:, t0:t0 + QUERY_BLOCK].to(cdt)
        qb = widen_queries(qb) if half else qb
        tq = qb.shape[1]
        scores = torch.einsum("bqhgd,bkhd->bhgqk", qb.view(batch, tq, Hkv, H // Hkv, Dh), kf) * Dh**-0.5
        dist = q_pos[:, t0:t0 + QUERY_BLOCK, None] - k_pos[:, None, :]  # [B, tq, P + T]
        visible = (k_pos[:, None, :] >= 0) & (dist >= 0)
        if window:
            visible &= dist < window
        if q_start is not None:  # keys of earlier documents
            visible &= k_pos[:, None, :] >= q_start[:, t0:t0 + QUERY_BLOCK, None]
        scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
        top = scores.amax(-1, keepdim=True).detach()
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows that see no key
        p = torch.exp(scores - top)
        denom = p.sum(-1, keepdim=True).clamp_min(torch.finfo(cdt).tiny)
        o = torch.einsum("bhgqk,bkhd->bqhgd", p / denom, vf)
        out.append(o.reshape(batch, tq, H, Dh))
    return torch.cat(out, dim=1).to(q.dtype)


def _check_chunk(op, q, k, v, q_pos, window):
    check_rank(op, "q", q, 4, "[B, T, H, Dh] (or [B, T, H, Dh/2], differential)")
    check_rank(op, "k", k, 4, "[B, T, Hkv, Dh]")
    batch, T, H, Dq = q.shape
    Hkv, Dh = k.shape[2:]
    check_float(op, "q", q)
    check_float(op, "k", k, (batch, T, Hkv, Dh))
    check_float(op, "v", v, (batch, T, Hkv, Dh))
    check_query_width(op, H, Dq, Dh)
    if H % Hkv:
        raise ValueError(f"{op}: key/value heads ({Hkv}) must divide query heads ({H})")
    check_positions(op, "q_pos", q_pos, (batch, T))
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"{op}: window must be an int >= 0 (0 = full causal), got {window!r}")
    return batch, Hkv, Dh


def _check_prefix(op, names, batch, Hkv, Dh, k_prefix, v_prefix, prefix_pos):
    check_rank(op, names[0], k_prefix, 4, "[B, P, Hkv, Dh]")
    P = k_prefix.shape[1]
    check_float(op, names[0], k_prefix, (batch, P, Hkv, Dh))
    check_float(op, names[1], v_prefix, (batch, P, Hkv, Dh))
    check_positions(op, names[2], prefix_pos, (batch, P))


def attention(q, k, v, q_pos, window=0, k_prefix=None, v_prefix=None, prefix_pos=None, q_start=None):
    """Masked softmax attention (see module docstring); returns [B, T, H, Dh], Dh the values' head dim."""
    op = "attention"
    batch, Hkv, Dh = _check_chunk(op, q, k, v, q_pos, window)
    given = [x is not None for x in (k_prefix, v_prefix, prefix_pos)]
    if any(given) and not all(given):
        raise ValueError(f"{op}: k_prefix, v_prefix and prefix_pos come together (all three or none)")
    if all(given):
        _check_prefix(op, ("k_prefix", "v_prefix", "prefix_pos"), batch, Hkv, Dh, k_prefix, v_prefix, prefix_pos)
    check_query_starts(op, "q_start", q_start, q_pos)
    fn = dispatch.resolve("attention", q.device, q.dtype)
    return fn(q, k, v, q_pos, window, k_prefix, v_prefix, prefix_pos, q_start)


def cache_append(k, v, q_pos, k_cache, v_cache, cache_pos):
    """Store the chunk's newest S keys, values and positions in place, position p in slot p mod S."""
    slots = cache_pos.shape[1]
    if slots == 0:
        return
    newest = slice(max(0, k.shape[1] - slots), None)
    k, v, positions = k[:, newest].detach(), v[:, newest].detach(), q_pos[:, newest]
    index = positions.remainder(slots)
    k_cache.scatter_(1, index[:, :, None, None].expand_as(k), k.to(k_cache.dtype))
    v_cache.scatter_(1, index[:, :, None, None].expand_as(v), v.to(v_cache.dtype))
    cache_pos.scatter_(1, index, positions)


def cache_before(cache_pos, q_pos):
    """The cache's positions with every slot at or after each row's first chunk position marked empty:
    what a chunk reads of a positional cache (module docstring)."""
    return cache_pos.masked_fill(cache_pos >= q_pos[:, :1], -1)


def attention_with_cache_reference(q, k, v, q_pos, window, k_cache, v_cache, cache_pos, q_start=None, append=True):
    out = attention_reference(q, k, v, q_pos, window, k_cache, v_cache, cache_before(cache_pos, q_pos), q_start)
    if append:
        cache_append(k, v, q_pos, k_cache, v_cache, cache_pos)
    return out


def attention_with_cache(q, k, v, q_pos, window, k_cache, v_cache, cache_pos, q_start=None, append=True):
    """`attention` over a state's positional cache and the chunk, then (`append`) the chunk stored in
    the cache in place (see module docstring); returns [B, T, H, Dh]. Gradients reach q, k and v, not
    the cache."""
    op = "attention_with_cache"
    batch, Hkv, Dh = _check_chunk(op, q, k, v, q_pos, window)
    _check_prefix(op, ("k_cache", "v_cache", "cache_pos"), batch, Hkv, Dh, k_cache, v_cache, cache_pos)
    check_query_starts(op, "q_start", q_start, q_pos)
    if not isinstance(append, bool):
        raise ValueError(f"{op}: append must be a bool, got {append!r}")
    fn = dispatch.resolve(op, q.device, q.dtype)
    return fn(q, k, v, q_pos, window, k_cache, v_cache, cache_pos, q_start, append)


dispatch.register("attention", "reference", attention_reference)
dispatch.register("attention_with_cache", "reference", attention_with_cache_reference)
