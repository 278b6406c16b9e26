"""Causal self-attention with grouped-query heads and RoPE: sliding-window (window > 0) or full.
Optionally without RoPE (`rope=False`: no positional encoding) and with biases on the projections.

With a state, a chunk attends to the cached keys plus itself, and its keys join the cache
(`ops.attention_with_cache`): a ring of the last window-1 positions (SWA), or a buffer that grows for
full attention, both indexed by position. Training, chunked prefill and decode run the same lines.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import attention, attention_with_cache, linear, qkv_rope
from ..state import KVCache

GROWING_INITIAL_CAPACITY = 256


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, window: int,
                 rope_base: float, rope: bool = True, bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window, self.rope_base, self.rope = window, rope_base, rope  # window 0: full causal attention
        self.qkv_proj = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)

    def init_state(self, batch_size: int, device=None, dtype=None, capacity: int | None = None, length: int = 0):
        """SWA: a ring of window-1 slots. Full attention: `capacity` slots to start with (they grow)."""
        slots = self.window - 1 if self.window else (capacity or GROWING_INITIAL_CAPACITY)
        kv = torch.zeros(batch_size, slots, self.n_kv_heads, self.head_dim, device=device, dtype=dtype)
        pos = torch.full((batch_size, slots), -1, device=device, dtype=torch.long)
        return KVCache(kv, kv.clone(), pos, grows=not self.window, length=length)

    def forward(self, x, positions, state=None, documents=None):
        batch, T, _ = x.shape
        # Packed documents: RoPE counts from each document's start, and no key before it is seen.
        angles = positions if documents is None else positions - documents.start
        extra = {} if documents is None else {"q_start": documents.start}
        qkv = _project(x, self.qkv_proj)
        if self.rope:
            q, k, v = qkv_rope(qkv, angles, self.n_heads, self.n_kv_heads, self.rope_base)
        else:
            q, k, v = qkv.unflatten(-1, (-1, self.head_dim)).split([self.n_heads, self.n_kv_heads, self.n_kv_heads], 2)
        if state is None:
            out = attention(q, k, v, positions, self.window, **extra)
        else:
            out = attention_with_cache(q, k, v, positions, self.window, *state.reserve(T), **extra)
        return _project(out.reshape(batch, T, self.n_heads * self.head_dim), self.out_proj)


def _project(x, proj: nn.Linear):
    y = linear(x, proj.weight)
    return y if proj.bias is None else y + proj.bias.to(y.dtype)
