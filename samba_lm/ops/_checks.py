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


def check_reset_flags(op: str, name: str, t: torch.Tensor | None, shape: tuple, device: torch.device):
    """An optional bool [B, T] tensor of document starts, on the inputs' device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be a bool tensor (True at a document's first token), got {got}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, the inputs on {device}")


def check_query_starts(op: str, name: str, t: torch.Tensor | None, q_pos: torch.Tensor):
    """Optional int64 [B, T] document starts of the queries, on q_pos's device. Where it is cheap (CPU
    tensors, not tracing) also q_start <= q_pos for real queries (q_pos >= 0): a query's document
    begins at or before it, so that it sees at least itself. On GPUs reading the values would
    synchronise: a query with q_start > q_pos sees no key there and returns zeros, as padding does."""
    if t is None:
        return
    check_positions(op, name, t, tuple(q_pos.shape))
    if t.device != q_pos.device:
        raise ValueError(f"{op}: {name} is on {t.device}, q_pos on {q_pos.device}")
    if t.device.type == "cpu" and not torch.compiler.is_compiling() and bool(((t > q_pos) & (q_pos >= 0)).any()):
        raise ValueError(f"{op}: {name} must be <= q_pos where q_pos >= 0 (a query's document starts at or "
                         f"before the query)")


def check_query_width(op: str, heads: int, q_dim: int, k_dim: int):
    """q's head dim: the keys', or half of it over an even number of heads (differential queries)."""
    if q_dim != k_dim and (2 * q_dim != k_dim or heads % 2):
        raise ValueError(f"{op}: q's head dim ({q_dim}) must be the keys' ({k_dim}), or half of it with an even "
                         f"number of query heads (differential queries), got {heads} heads")
