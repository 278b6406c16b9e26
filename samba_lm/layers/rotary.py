"""Rotary position embedding, rotate-half (GPT-NeoX) style over the full head dim.

Angles are computed from absolute stream positions in float64 (float32 where the device has no
float64), so that position 1,000,000 rotates as precisely as position 10 and any chunking of a
stream sees bit-identical angles.
"""

from __future__ import annotations

import torch

from ..ops._checks import compute_dtype


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """x [B, T, H, Dh], positions [B, T] (int64) -> x rotated, same dtype."""
    head_dim = x.shape[-1]
    angle_dtype = torch.float32 if x.device.type == "mps" else torch.float64
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=x.device, dtype=angle_dtype) / head_dim)
    angles = positions.to(angle_dtype)[..., None] * inv_freq  # [B, T, Dh/2]
    cdt = compute_dtype(x.dtype)
    cos = angles.cos().to(cdt).repeat(1, 1, 2)[:, :, None, :]
    sin = angles.sin().to(cdt).repeat(1, 1, 2)[:, :, None, :]
    xf = x.to(cdt)
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
