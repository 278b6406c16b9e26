"""Argument checks shared by every op: messages name the op, the argument and the rule."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float(op: str, name: str, t: torch.Tensor | None, shape: tuple | None = None, optional=False):
    if t is None:
        if optional:
            return
        raise ValueError(f"{op}: {name} is required")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_positions(op: str, name: str, t: torch.Tensor, shape: tuple):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
        raise ValueError(f"{op}: {name} must be an int64 tensor of positions")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_rank(op: str, name: str, t: torch.Tensor, rank: int, layout: str):
    if not isinstance(t, torch.Tensor) or t.dim() != rank:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must have layout {layout}, got {got}")


def check_projection(op: str, x: torch.Tensor, weight: torch.Tensor, layout: str = "[N, K]"):
    """x [..., K] and a float weight [N, K] (nn.Linear's layout) that multiplies it."""
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: weight must be {layout} with {layout[-2]} = x's last dim ({tuple(x.shape)}), "
                         f"got {tuple(weight.shape)}")
