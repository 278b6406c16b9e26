"""Differential attention's mix (SambaY): the attention op's two halves of heads to the layer's
normalised output, before out_proj.

Shapes (H query heads, Dh the head dim; the op's heads are 2 Dh wide, each half's softmax over [v1 | v2]):
    out [B, T, H, 2 Dh] (heads interleaved as the model's: even heads the first half, odd the second)
    lambda_q1, lambda_k1, lambda_q2, lambda_k2 [Dh]   lambda_init (float)   weight [2 Dh]   eps > 0
    -> y [B, T, H/2, 2 Dh] (weight's dtype)

    lambda = exp(sum(lambda_q1 * lambda_k1)) - exp(sum(lambda_q2 * lambda_k2)) + lambda_init
    diff   = out[:, :, 0::2] - lambda * out[:, :, 1::2]        (float32, rounded to out's dtype)
    y      = RMSNorm(diff) * weight * (1 - lambda_init)        (add_rmsnorm's roundings, then the scale)

The reference composes torch ops and `add_rmsnorm`; the Triton backend runs one kernel per call
without gradients (decode: some fifteen launches a layer become one) and the composition with them.
"""

from __future__ import annotations

import math

import torch

from . import dispatch
from ._checks import check_float, check_rank, compute_dtype
from .norm import add_rmsnorm


def differential_mix_reference(out, lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init, weight, eps):
    a1, a2 = out[:, :, 0::2], out[:, :, 1::2]
    cdt = compute_dtype(out.dtype)
    lam = (torch.exp((lambda_q1 * lambda_k1).to(cdt).sum()) - torch.exp((lambda_q2 * lambda_k2).to(cdt).sum())
           + lambda_init)
    diff = (a1.to(cdt) - lam * a2.to(cdt)).to(out.dtype)
    _, normed = add_rmsnorm(diff, None, weight, eps)
    return normed * (1 - lambda_init)


def differential_mix(out, lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init, weight, eps):
    """Differential attention's two halves of heads mixed and normalised (see module docstring)."""
    op = "differential_mix"
    check_rank(op, "out", out, 4, "[B, T, H, 2 Dh]")
    check_float(op, "out", out)
    heads, width = out.shape[2:]
    if heads % 2 or width % 2:
        raise ValueError(f"{op}: out [B, T, H, 2 Dh] needs an even H and an even width, got {tuple(out.shape)}")
    for name, t in (("lambda_q1", lambda_q1), ("lambda_k1", lambda_k1), ("lambda_q2", lambda_q2),
                    ("lambda_k2", lambda_k2)):
        check_float(op, name, t, (width // 2,))
    check_float(op, "weight", weight, (width,))
    for name, v in (("lambda_init", lambda_init), ("eps", eps)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be a finite float, got {v!r}")
    if not eps > 0:
        raise ValueError(f"{op}: eps must be positive, got {eps!r}")
    dtype = out.dtype
    for t in (lambda_q1, lambda_k1, lambda_q2, lambda_k2, weight):
        dtype = torch.promote_types(dtype, t.dtype)
    fn = dispatch.resolve(op, out.device, dtype)
    return fn(out, lambda_q1, lambda_k1, lambda_q2, lambda_k2, float(lambda_init), weight, float(eps))


dispatch.register("differential_mix", "reference", differential_mix_reference)
