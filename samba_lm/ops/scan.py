"""Mamba-1 selective scan with the softplus, D skip and SiLU(z) gate fused in.

Shapes (B batch, T time, E = d_inner channels, N = d_state):
    u, delta, z  [B, T, E]      A  [E, N]      B, C  [B, T, N]      D, delta_bias  [E]
    initial_state / final_state  [B, E, N], float32 (float64 for float64 inputs)

    dt_t = softplus(delta_t + delta_bias)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t          (h_{-1} = initial_state, or 0)
    y_t  = (C_t . h_t + D * u_t) * silu(z_t)

Packed documents: reset [B, T] bool, True at a document's first token, zeroes the state just before
that step (h_{t-1} := 0: a step whose decay is zero), so each document runs as it would alone, its
gradients too: none flows across a reset (a row reset at t = 0 ignores initial_state, which then gets
a zero gradient and may hold anything, even NaN). The final state is the row's last document's.

The reference walks time in chunks of CHUNK steps: decays and inputs are computed for a whole chunk
at once ([B, CHUNK, E, N], never [B, T, E, N]), then the recurrence steps through it. Under autograd
each chunk is recomputed in the backward (activation checkpointing), so memory stays linear in T.
(A log-depth Hillis-Steele scan inside the chunk was measured slower on CPUs.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import dispatch
from ._checks import check_float, check_rank, check_reset_flags, compute_dtype

CHUNK = 16


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None, reset=None):
    cdt = compute_dtype(u.dtype)
    batch, T, E = u.shape
    h = (initial_state.to(cdt) if initial_state is not None
         else torch.zeros(batch, E, A.shape[1], device=u.device, dtype=cdt))
    if reset is not None and T > 0:  # where, not a product: a discarded state may be NaN
        h = h.masked_fill(reset[:, 0, None, None], 0.0)
    A, bias = A.to(cdt), (delta_bias.to(cdt) if delta_bias is not None else None)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, h, bias))
    ys = []
    for t0 in range(0, T, CHUNK):
        chunk = (u[:, t0:t0 + CHUNK], delta[:, t0:t0 + CHUNK], B[:, t0:t0 + CHUNK], C[:, t0:t0 + CHUNK],
                 reset[:, t0:t0 + CHUNK] if reset is not None else None)
        if needs_grad:
            y, h = checkpoint(_scan_chunk, *chunk, h, A, bias, use_reentrant=False)
        else:
            y, h = _scan_chunk(*chunk, h, A, bias)
        ys.append(y)
    y = torch.cat(ys, dim=1)
    if D is not None:
        y = y + u.to(cdt) * D.to(cdt)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(u.dtype), h


def _scan_chunk(u, delta, B, C, reset, h0, A, bias):
    cdt = h0.dtype
    dt = delta.to(cdt)
    dt = F.softplus(dt + bias if bias is not None else dt)  # [B, c, E]
    decay = torch.exp(dt[..., None] * A)  # [B, c, E, N]
    if reset is not None:  # a document's first step keeps nothing of the state before it
        decay = decay.masked_fill(reset[..., None, None], 0.0)
    inputs = (dt * u.to(cdt))[..., None] * B.to(cdt)[:, :, None, :]
    h, hs = h0, []
    for a_t, b_t in zip(decay.unbind(1), inputs.unbind(1)):  # unbind: a cheap backward, unlike [:, t]
        h = torch.addcmul(b_t, a_t, h)
        hs.append(h)
    y = torch.einsum("bten,btn->bte", torch.stack(hs, dim=1), C.to(cdt))
    return y, h


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None, reset=None):
    """Selective scan (see module docstring); returns (y [B, T, E], final_state [B, E, N]).

    reset: optional bool [B, T], True at a document's first token (see module docstring); None is the
    plain stream. When no gradient is needed, a backend may write the final state into `initial_state`
    and return that same tensor (the Triton decode step does: one read and one write of the state per
    token)."""
    op = "selective_scan"
    check_rank(op, "u", u, 3, "[B, T, E]")
    check_rank(op, "A", A, 2, "[E, N]")
    batch, T, E = u.shape
    N = A.shape[1]
    check_float(op, "u", u)
    check_float(op, "delta", delta, (batch, T, E))
    check_float(op, "A", A, (E, N))
    check_float(op, "B", B, (batch, T, N))
    check_float(op, "C", C, (batch, T, N))
    check_float(op, "D", D, (E,), optional=True)
    check_float(op, "z", z, (batch, T, E), optional=True)
    check_float(op, "delta_bias", delta_bias, (E,), optional=True)
    check_float(op, "initial_state", initial_state, (batch, E, N), optional=True)
    check_reset_flags(op, "reset", reset, (batch, T), u.device)
    fn = dispatch.resolve("selective_scan", u.device, u.dtype)
    return fn(u, delta, A, B, C, D, z, delta_bias, initial_state, reset)


dispatch.register("selective_scan", "reference", selective_scan_reference)
