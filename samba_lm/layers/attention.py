"""Causal self-attention with grouped-query heads and RoPE: sliding-window (window > 0) or full.
Optionally without RoPE (`rope=False`: no positional encoding) and with biases on the projections.
`DifferentialAttention` is SambaY's variant of it.

With a state, a chunk attends to the cached keys plus itself, and its keys join the cache
(`ops.attention_with_cache`): a ring of the last window-1 positions (SWA), or a buffer that grows for
full attention, both indexed by position. Training, chunked prefill and decode run the same lines.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ..ops import attention, attention_with_cache, differential_mix, linear, qkv_rope
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
        self.cache_heads, self.cache_dim = n_kv_heads, head_dim  # cached keys (and values) a position, their width

    def init_state(self, batch_size: int, device=None, dtype=None, capacity: int | None = None, length: int = 0):
        """SWA: a ring of window-1 slots. Full attention: `capacity` slots to start with (they grow)."""
        slots = self.window - 1 if self.window else (capacity or GROWING_INITIAL_CAPACITY)
        kv = torch.zeros(batch_size, slots, self.cache_heads, self.cache_dim, device=device, dtype=dtype)
        pos = torch.full((batch_size, slots), -1, device=device, dtype=torch.long)
        return KVCache(kv, kv.clone(), pos, grows=not self.window, length=length)

    def forward(self, x, positions, state=None, documents=None):
        batch, T, _ = x.shape
        q, k, v = self._heads(x, positions, documents)
        out = self._attend(q, k, v, positions, documents, state.reserve(T) if state is not None else None)
        return _project(out.reshape(batch, T, self.n_heads * self.head_dim), self.out_proj)

    def _heads(self, x, positions, documents):
        """q, k, v [B, T, heads, Dh]; packed documents: RoPE counts from each document's start."""
        qkv = _project(x, self.qkv_proj)
        if not self.rope:
            return qkv.unflatten(-1, (-1, self.head_dim)).split([self.n_heads, self.n_kv_heads, self.n_kv_heads], 2)
        angles = positions if documents is None else positions - documents.start
        return qkv_rope(qkv, angles, self.n_heads, self.n_kv_heads, self.rope_base)

    def _attend(self, q, k, v, positions, documents, cache=None):
        """Attention over the chunk, or over `cache` (a state's reserved buffers) and the chunk."""
        extra = {} if documents is None else {"q_start": documents.start}  # no key before a document's start
        if cache is None:
            return attention(q, k, v, positions, self.window, **extra)
        return attention_with_cache(q, k, v, positions, self.window, *cache, **extra)


class DifferentialAttention(Attention):
    """Differential attention, as SambaY (Phi-4-mini-flash) has it: the heads split interleaved into
    two halves (even heads q1, k1, v1; odd heads q2, k2, v2), each half's softmax reads V = [v1 | v2],

        A1 = [attn(q1, k1, v1) | attn(q1, k1, v2)],   A2 = [attn(q2, k2, v1) | attn(q2, k2, v2)]
        out = out_proj(subln(A1 - lambda A2) * (1 - lambda_init)),  subln an RMSNorm over 2 Dh,
        lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init,
        lambda_init = 0.8 - 0.6 exp(-0.3 depth)   (depth: the block's index, mixer + MLP a block).

    Both halves are one call of the attention op, over Hkv/2 key/value heads of 2 Dh: the model's
    own k and v, adjacent heads paired, [k1 | k2] and [v1 | v2], as computed (and cached) with no copy.
    The queries stay Dh wide: the op's differential queries, head h scored against half h mod 2 of
    its 2 Dh-wide key head (even heads k1, odd k2) at scale Dh^-0.5, so the model's interleaved head
    order is already the op's grouping (phi4-mini-flash's 40/20 heads: query heads 4j..4j+3 read pair
    j). The layer pads nothing: the decode kernels read such queries as they are (the other paths of
    the op widen them)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, window: int,
                 rope_base: float, rope: bool, bias: bool, depth: int, eps: float):
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, window, rope_base, rope, bias)
        self.cache_heads, self.cache_dim, self.eps = n_kv_heads // 2, 2 * head_dim, eps
        _differential_parameters(self, head_dim, depth)

    def reset_parameters(self):
        _reset_differential(self)

    share_kv = False  # a full layer with cross layers above: forward also returns its SharedKV

    def forward(self, x, positions, state=None, documents=None):
        q, k, v = self._heads(x, positions, documents)
        k, v = _paired(k), _paired(v)
        cache = state.reserve(q.shape[1]) if state is not None else None
        shared = SharedKV(k, v, positions, cache) if self.share_kv else None
        out = _differential(self, self._attend(q, k, v, positions, documents, cache))
        return (out, shared) if self.share_kv else out


class SharedKV(NamedTuple):
    """A full differential layer's keys and values as its cross layers read them (SambaY): the chunk's
    (heads paired, as the layer's op call takes them), and with a state its cache buffers
    (k, v, positions), which by the time the cross layers read them hold the chunk too."""
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor  # the chunk's positions
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


class CrossDifferentialAttention(nn.Module):
    """SambaY's cross layer: differential attention whose queries are its own (`q_proj`, with bias)
    and whose keys and values are the latest full differential layer's below, shared, not copied:
    over the chunk and that layer's cache, causal and full. It keeps no state of its own. Its queries
    take no RoPE (SambaY has none; the config refuses RoPE with cross layers)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool, depth: int,
                 eps: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.eps = n_heads, n_kv_heads, head_dim, eps
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        _differential_parameters(self, head_dim, depth)

    def reset_parameters(self):
        _reset_differential(self)

    def init_state(self, batch_size, device=None, dtype=None):
        return None

    def forward(self, x, positions, state=None, documents=None, kv: SharedKV | None = None):
        if kv is None:
            raise ValueError("a cross layer needs the keys and values of a 'dattn' layer before it")
        q = _project(x, self.q_proj).unflatten(-1, (self.n_heads, self.head_dim))
        extra = {} if documents is None else {"q_start": documents.start}
        early = kv.k.shape[1] - q.shape[1]  # YOCO: queries for the chunk's last positions only
        k, v = kv.k[:, early:], kv.v[:, early:]
        if kv.cache is not None:
            # The full layer's cache holds every earlier position, the chunk's too: read positionally,
            # below the queries' first position (the chunk's earlier keys included), it costs what is
            # filled, and the captured decode step reads it as far as each row has come.
            out = attention_with_cache(q, k, v, positions, 0, *kv.cache, append=False, **extra)
        else:  # without a state the chunk's earlier keys are the prefix
            prefix = [t[:, :early].contiguous() for t in (kv.k, kv.v, kv.pos)] if early else []
            out = attention(q, k, v, positions, 0, *prefix, **extra)
        return _differential(self, out)


def _differential_parameters(layer: nn.Module, head_dim: int, depth: int):
    layer.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * depth)
    layer.lambda_q1, layer.lambda_k1, layer.lambda_q2, layer.lambda_k2 = (
        nn.Parameter(torch.empty(head_dim)) for _ in range(4))
    layer.subln_weight = nn.Parameter(torch.empty(2 * head_dim))
    layer.reset_parameters()


@torch.no_grad()
def _reset_differential(layer: nn.Module):
    """The DIFF Transformer's: lambda vectors N(0, 0.1), subln weight 1."""
    for p in (layer.lambda_q1, layer.lambda_k1, layer.lambda_q2, layer.lambda_k2):
        nn.init.normal_(p, std=0.1)
    nn.init.ones_(layer.subln_weight)


def _paired(t):
    """k or v [B, T, Hkv, Dh] as [B, T, Hkv/2, 2 Dh]: heads 2j and 2j + 1 side by side, [k1 | k2] (a view)."""
    return t.flatten(-2).unflatten(-1, (-1, 2 * t.shape[-1]))


def _differential(layer, out):
    """The attention op's [B, T, H, 2 Dh] (each head over [v1 | v2]) to the layer's output."""
    batch, T = out.shape[:2]
    normed = differential_mix(out, layer.lambda_q1, layer.lambda_k1, layer.lambda_q2, layer.lambda_k2,
                              layer.lambda_init, layer.subln_weight, layer.eps)
    return _project(normed.reshape(batch, T, layer.n_heads * layer.head_dim), layer.out_proj)


def _project(x, proj: nn.Linear):
    return linear(x, proj.weight, proj.bias)
