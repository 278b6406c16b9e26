"""Rotary position embedding on the attention's fused QKV projection: split into heads, rotate q and k.

Shapes (B batch, T time, H query heads, Hkv key/value heads dividing H, Dh head dim, even):
    qkv [B, T, (H + 2*Hkv) * Dh] (query heads, then key heads, then value heads)   positions [B, T] (int64)
    -> q [B, T, H, Dh]   k [B, T, Hkv, Dh]   v [B, T, Hkv, Dh]   (qkv's dtype)

Rotate-half (GPT-NeoX) style over the full head dim: the pair (x_i, x_{i+Dh/2}) turns by the angle
p * base^(-2i/Dh) at position p; a negative position (left padding) turns the other way. v is not
rotated. Angles are computed from absolute stream positions in float64 (float32 where the device has
none), so that position 1,000,000 rotates as precisely as position 10 and any chunking of a stream
sees bit-identical angles; the rotation itself runs in fp32 (float64 for float64 inputs).
"""

from __future__ import annotations

import functools

import torch

from . import dispatch
from ._checks import check_float, check_positions, check_rank, compute_dtype


def _angle_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def rope_inv_freq(head_dim: int, base: float, device: torch.device) -> torch.Tensor:
    """base^(-2i/Dh), i < Dh/2, in float64 (float32 where the device has none): made once per head
    dim, base and device, not per call (a decode step would spend launches on it). Under torch.compile
    it is traced into the graph instead (dynamo would step around the cache, with a warning)."""
    if torch.compiler.is_compiling():
        return _inv_freq(head_dim, base, torch.device(device))
    return _cached_inv_freq(head_dim, base, torch.device(device))


def _inv_freq(head_dim: int, base: float, device: torch.device) -> torch.Tensor:
    dtype = _angle_dtype(device)
    with torch.inference_mode(False):  # a normal tensor, which autograd may save, whatever mode made it first
        return base ** (-torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim)


_cached_inv_freq = functools.lru_cache(maxsize=64)(_inv_freq)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos and sin [B, T, Dh/2] of the rotation angles, computed in float64 and cast to dtype."""
    angles = positions.to(_angle_dtype(positions.device))[..., None] * rope_inv_freq(head_dim, base, positions.device)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def qkv_rope_reference(qkv, positions, n_heads, n_kv_heads, base):
    heads = qkv.unflatten(-1, (n_heads + 2 * n_kv_heads, -1))  # a view: qkv's last dim is split only
    cdt = compute_dtype(qkv.dtype)
    cos, sin = rope_cos_sin(positions, heads.shape[-1], base, cdt)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]

    def rotate(x):
        x1, x2 = x.to(cdt).chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(qkv.dtype)

    q, k, v = heads.split([n_heads, n_kv_heads, n_kv_heads], dim=2)
    return rotate(q), rotate(k), v


def qkv_rope(qkv, positions, n_heads, n_kv_heads, base):
    """Split the QKV projection into heads and rotate q and k (see module docstring); returns (q, k, v)."""
    op = "qkv_rope"
    check_rank(op, "qkv", qkv, 3, "[B, T, (H + 2*Hkv) * Dh]")
    check_float(op, "qkv", qkv)
    for name, n in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
        if not isinstance(n, int) or n <= 0:
            raise ValueError(f"{op}: {name} must be a positive int, got {n!r}")
    if n_heads % n_kv_heads:
        raise ValueError(f"{op}: n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
    width, n_all = qkv.shape[-1], n_heads + 2 * n_kv_heads
    if width % n_all:
        raise ValueError(f"{op}: qkv's last dim ({width}) must be (n_heads + 2 * n_kv_heads) * Dh = {n_all} * Dh")
    if (width // n_all) % 2:
        raise ValueError(f"{op}: the head dim Dh = qkv's last dim / (n_heads + 2 * n_kv_heads) = {width // n_all} "
                         "must be even (rotate-half pairs)")
    check_positions(op, "positions", positions, qkv.shape[:2])
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 0:
        raise ValueError(f"{op}: base must be a positive number, got {base!r}")
    fn = dispatch.resolve("qkv_rope", qkv.device, qkv.dtype)
    return fn(qkv, positions, n_heads, n_kv_heads, base)


dispatch.register("qkv_rope", "reference", qkv_rope_reference)
