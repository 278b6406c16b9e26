"""Causal self-attention with grouped-query heads and RoPE: sliding-window (window > 0) or full.

With a state, a chunk attends to the cached keys (the op's prefix) plus itself, then its keys are
appended; the cache is a ring of the last window-1 positions (SWA) or a growing buffer (full
attention). Both are told apart by positions alone, so training, chunked prefill and decode run the
same lines.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import attention, qkv_rope
from ..state import GrowingKV, RingKV

GROWING_INITIAL_CAPACITY = 256


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, window: int,
                 rope_base: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window, self.rope_base = window, rope_base  # window 0: full causal attention
        self.qkv_proj = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=False)
        self.out_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def init_state(self, batch_size: int, device=None, dtype=None):
        slots = self.window - 1 if self.window else GROWING_INITIAL_CAPACITY
        kv = torch.zeros(batch_size, slots, self.n_kv_heads, self.head_dim, device=device, dtype=dtype)
        pos = torch.full((batch_size, slots), -1, device=device, dtype=torch.long)
        return RingKV(kv, kv.clone(), pos) if self.window else GrowingKV(kv, kv.clone(), pos)

    def forward(self, x, positions, state=None):
        batch, T, _ = x.shape
        q, k, v = qkv_rope(self.qkv_proj(x), positions, self.n_heads, self.n_kv_heads, self.rope_base)
        prefix = state.prefix(k.dtype) if state is not None else ()
        out = attention(q, k, v, positions, self.window, *prefix)
        if state is not None:
            state.append(k, v, positions)
        return self.out_proj(out.reshape(batch, T, self.n_heads * self.head_dim))
