"""The projections: y = x @ weight^T (+ bias: none in Samba, SambaY's attention has them).

Shapes (any leading dims, K inputs, N outputs):
    x [..., K]   weight [N, K] (nn.Linear's layout)   bias [N] or None   -> y [..., N] in x's dtype

The reference is `F.linear` (cuBLAS on a GPU, autocast-aware). A decode step multiplies a few rows
by every weight matrix once: the step is a stream of the weights, and there the Triton backend runs
a kernel made for it (`triton_linear.py`) where it reads the weights faster than cuBLAS does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from ._checks import check_float, check_projection


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts x to for a matmul, or None: autocast off on x's device, or x float64
    (which autocast leaves alone)."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return None


def linear_reference(x, weight, bias=None):
    return F.linear(x, weight, bias)


def linear(x, weight, bias=None):
    """x @ weight^T + bias (see module docstring)."""
    op = "linear"
    check_projection(op, x, weight)
    check_float(op, "bias", bias, (weight.shape[0],), optional=True)
    fn = dispatch.resolve(op, x.device, x.dtype)
    return fn(x, weight, bias)


dispatch.register("linear", "reference", linear_reference)
