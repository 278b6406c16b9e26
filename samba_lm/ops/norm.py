"""Residual add + RMSNorm (weight only), fused: a pre-norm block's `h = h + mixer(...)`, then `norm(h)`;
and residual add + LayerNorm (weight and bias: SambaY's norms), the same with y centred first.

Shapes (D model width; any leading dims, in the model [B, T, D]):
    h [..., D] (the residual stream: float32, float64 in a float64 model)   delta [..., D] or None
    weight [D]   eps > 0   out_dtype: y's dtype, or None for the weight's
    -> s [..., D] (h's dtype)   y [..., D] (out_dtype)

    s = h + delta              (delta upcast to h's dtype; s = h when delta is None)
    y = s * rsqrt(mean(s^2) + eps) * weight

s is added in h's dtype so the residual stream keeps its precision whatever the mixers' dtype (bf16
under autocast); y is computed in float32 (float64 for float64) and rounded once to the weight's
dtype (or out_dtype), exactly as `layers.norm.RMSNorm` computes it. Returns (s, y): s is the next
residual stream, y the normalised input of the next sub-layer. Under autocast the model asks for y in
autocast's dtype (`out_dtype`): the bits the next matmul would have cast it to, without an fp32 y
written, read back and cast (and its gradient cast back) around every norm.

`add_layernorm(h, delta, weight, bias, eps)` returns (s, y) with
    y = (s - mean(s)) * rsqrt(var(s) + eps) * weight + bias      (var: the biased variance)
computed the same way (float32, rounded once), as `layers.norm.LayerNorm` computes it.
"""

from __future__ import annotations

import math

import torch

from . import dispatch
from ._checks import check_float, compute_dtype


def add_rmsnorm_reference(h, delta, weight, eps, out_dtype=None):
    s = h if delta is None else h + delta.to(h.dtype)
    xf = s.to(compute_dtype(s.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return s, (y * weight.to(y.dtype)).to(out_dtype or weight.dtype)


def add_layernorm_reference(h, delta, weight, bias, eps, out_dtype=None):
    s = h if delta is None else h + delta.to(h.dtype)
    cdt = compute_dtype(s.dtype)
    y = torch.nn.functional.layer_norm(s.to(cdt), s.shape[-1:], weight.to(cdt), bias.to(cdt), eps)
    return s, y.to(out_dtype or weight.dtype)


def _check_norm(op, h, delta, weight, eps, out_dtype):
    check_float(op, "h", h)
    if h.dim() == 0:
        raise ValueError(f"{op}: h must have layout [..., D], got a scalar")
    check_float(op, "delta", delta, tuple(h.shape), optional=True)
    check_float(op, "weight", weight, (h.shape[-1],))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"{op}: eps must be a positive float, got {eps!r}")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"{op}: out_dtype must be a floating-point torch.dtype or None, got {out_dtype!r}")


def _widest(*tensors):
    """One dtype for the dispatcher: float64 if any input is float64 (the kernels run fp16/bf16/fp32)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = dtype if t is None else torch.promote_types(dtype, t.dtype)
    return dtype


def add_rmsnorm(h, delta, weight, eps, out_dtype=None):
    """s = h + delta and y = RMSNorm(s) * weight, y in out_dtype (default the weight's dtype; see module
    docstring); returns (s, y)."""
    _check_norm("add_rmsnorm", h, delta, weight, eps, out_dtype)
    fn = dispatch.resolve("add_rmsnorm", h.device, _widest(h, delta, weight))
    return fn(h, delta, weight, eps, out_dtype)


def add_layernorm(h, delta, weight, bias, eps, out_dtype=None):
    """s = h + delta and y = LayerNorm(s) * weight + bias, y in out_dtype (default the weight's dtype);
    returns (s, y)."""
    op = "add_layernorm"
    _check_norm(op, h, delta, weight, eps, out_dtype)
    check_float(op, "bias", bias, (h.shape[-1],))
    fn = dispatch.resolve(op, h.device, _widest(h, delta, weight, bias))
    return fn(h, delta, weight, bias, eps, out_dtype)


dispatch.register("add_rmsnorm", "reference", add_rmsnorm_reference)
dispatch.register("add_layernorm", "reference", add_layernorm_reference)
