"""Causal attention over position-labelled keys: sliding-window or full, grouped-query heads.

Shapes (B batch, Tq queries, Tk keys, H query heads, Hkv key/value heads dividing H, Dh head dim):
    q [B, Tq, H, Dh]   k, v [B, Tk, Hkv, Dh]   q_pos [B, Tq]   k_pos [B, Tk]   (int64)   out like q

Key j is visible to query i when k_pos[j] >= 0 and 0 <= q_pos[i] - k_pos[j] < window (window 0: no
limit). Keys may come in any order (a ring buffer followed by a chunk); a negative position marks an
empty slot or padding. A query that sees no key returns zeros. Softmax scale is 1/sqrt(Dh).

The reference takes queries in blocks against all keys, so it never holds a Tq x Tk matrix.
"""

from __future__ import annotations

import torch

from . import dispatch
from ._checks import check_float, check_positions, check_rank, compute_dtype

QUERY_BLOCK = 128


def attention_reference(q, k, v, q_pos, k_pos, window=0):
    cdt = compute_dtype(q.dtype)
    batch, Tq, H, Dh = q.shape
    Hkv = k.shape[2]
    kf, vf = k.to(cdt), v.to(cdt)
    out = []
    for t0 in range(0, Tq, QUERY_BLOCK):
        qb = q[:, t0:t0 + QUERY_BLOCK].to(cdt)
        tq = qb.shape[1]
        scores = torch.einsum("bqhgd,bkhd->bhgqk", qb.view(batch, tq, Hkv, H // Hkv, Dh), kf) * Dh**-0.5
        dist = q_pos[:, t0:t0 + QUERY_BLOCK, None] - k_pos[:, None, :]  # [B, tq, Tk]
        visible = (k_pos[:, None, :] >= 0) & (dist >= 0)
        if window:
            visible &= dist < window
        scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
        top = scores.amax(-1, keepdim=True).detach()
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows that see no key
        p = torch.exp(scores - top)
        denom = p.sum(-1, keepdim=True).clamp_min(torch.finfo(cdt).tiny)
        o = torch.einsum("bhgqk,bkhd->bqhgd", p / denom, vf)
        out.append(o.reshape(batch, tq, H, Dh))
    return torch.cat(out, dim=1).to(q.dtype)


def attention(q, k, v, q_pos, k_pos, window=0):
    """Masked softmax attention (see module docstring); returns [B, Tq, H, Dh]."""
    op = "attention"
    check_rank(op, "q", q, 4, "[B, Tq, H, Dh]")
    check_rank(op, "k", k, 4, "[B, Tk, Hkv, Dh]")
    batch, Tq, H, Dh = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    check_float(op, "q", q)
    check_float(op, "k", k, (batch, Tk, Hkv, Dh))
    check_float(op, "v", v, (batch, Tk, Hkv, Dh))
    if H % Hkv:
        raise ValueError(f"{op}: key/value heads ({Hkv}) must divide query heads ({H})")
    check_positions(op, "q_pos", q_pos, (batch, Tq))
    check_positions(op, "k_pos", k_pos, (batch, Tk))
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"{op}: window must be an int >= 0 (0 = full causal), got {window!r}")
    fn = dispatch.resolve("attention", q.device, q.dtype)
    return fn(q, k, v, q_pos, k_pos, window)


dispatch.register("attention", "reference", attention_reference)
