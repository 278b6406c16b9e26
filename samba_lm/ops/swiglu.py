"""SwiGLU gating on the MLP's fused gate/up projection.

Shapes (H the MLP's hidden width; any leading dims, in the model [B, T, 2H]):
    x [..., 2H] (gate first, then up; a view with a contiguous last dim is fine)   -> y [..., H] (x's dtype)

    y = silu(x[..., :H]) * x[..., H:]

computed in float32 (float64 for float64) and rounded once at the end, so a bf16 projection loses no
more than one rounding to the gating.
"""

from __future__ import annotations

import torch.nn.functional as F

from . import dispatch
from ._checks import check_float, compute_dtype


def swiglu_reference(x):
    gate, up = x.to(compute_dtype(x.dtype)).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def swiglu(x):
    """silu(gate) * up of the fused projection x [..., 2H] (see module docstring); returns y [..., H]."""
    op = "swiglu"
    check_float(op, "x", x)
    if x.dim() == 0 or x.shape[-1] % 2:
        got = tuple(x.shape) if x.dim() else "a scalar"
        raise ValueError(f"{op}: x must have layout [..., 2H] (an even last dim: gate, then up), got {got}")
    fn = dispatch.resolve("swiglu", x.device, x.dtype)
    return fn(x)


dispatch.register("swiglu", "reference", swiglu_reference)
