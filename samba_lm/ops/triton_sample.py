"""`choose_tokens` in Triton: one program per row walks the vocabulary in blocks with a running argmax.

Layout (as `sample.py`): logits [B, V] with the vocabulary contiguous; the per-row settings [B]; tokens
[B, 1] contiguous, updated in place with finished. The hash is the reference's, in int64 arithmetic
holding 32-bit values (products wrap mod 2^64; their low 32 bits are the 32-bit products), so the noise
bits match it exactly. One launch replaces about ten (scaling, noise, mask, argmax, the finished
rows, the stop tokens). What the reference covers that this does not: CPUs (except under
TRITON_INTERPRET=1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import tuning
from .sample import MIX, SEED_SALT

M0 = tl.constexpr(MIX[0])
M1 = tl.constexpr(MIX[1])
SALT = tl.constexpr(SEED_SALT)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * M0) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * M1) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _choose_kernel(logits_ptr, temp_ptr, floor_ptr, seed_ptr, pos_ptr, tok_ptr, fin_ptr, stop_ptr, V, s_lb,
                   N_STOPS: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0)
    t = tl.load(temp_ptr + b)
    floor = tl.load(floor_ptr + b)
    hot = t > 0
    t = tl.where(hot, t, 1.0)
    seed = tl.load(seed_ptr + b)
    key = _mix32((seed & 0xFFFFFFFF) ^ _mix32(((seed >> 32) & 0xFFFFFFFF) ^ SALT))
    key = _mix32(key ^ (tl.load(pos_ptr + b) & 0xFFFFFFFF))
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_v = tl.zeros([BLOCK_V], tl.int64)
    for v0 in range(0, V, BLOCK_V):  # per lane, the best so far; strict > keeps the earliest on ties
        v = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(logits_ptr + b * s_lb + v, mask=v < V, other=float("-inf")).to(tl.float32)
        if hot:
            bits = _mix32(key ^ _mix32(v.to(tl.int64)))
            u = ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24
            # div_rn: IEEE division as torch's (Triton's `/` is approximate), the reference's scores exactly
            score = tl.where(x >= floor, tl.div_rn(x, t) - tl.log(-tl.log(u)), float("-inf"))
        else:
            score = x
        score = tl.where(v < V, score, float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_v = tl.where(better, v.to(tl.int64), best_v)
    top = tl.max(best, axis=0)
    chosen = tl.min(tl.where(best == top, best_v, V), axis=0)  # the smallest index among the maxima
    done = tl.load(fin_ptr + b) != 0
    token = tl.where(done, tl.load(tok_ptr + b), chosen)
    stops = tl.load(stop_ptr + tl.arange(0, N_STOPS))
    tl.store(tok_ptr + b, token)
    tl.store(fin_ptr + b, (done | (tl.sum((stops == token).to(tl.int32), axis=0) > 0)).to(tl.int1))


@tuning.register("sample")
@dataclass(frozen=True)
class SampleTuning(tuning.Tuning):
    """The token choice's tile (`tuning.tuned(sample=...)`)."""

    block_v: int = 2048
    """Vocabulary entries per step of a row's walk (the choice is the same at any size: ties go to the
    smallest index)."""


def choose_tokens_triton(logits, temperature, floor, seeds, positions, tokens, finished, stops):
    batch, V = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    n_stops = triton.next_power_of_2(len(stops))
    if n_stops != len(stops):  # pad with -1 (no token): the kernel reads a power of two
        stops = torch.cat([stops, stops.new_full((n_stops - len(stops),), -1)])
    _choose_tokens_op(logits, temperature, floor, seeds, positions, tokens, finished, stops)
    return tokens.view(-1)


@torch.library.custom_op("samba_lm::choose_tokens", mutates_args=("tokens", "finished"))
def _choose_tokens_op(logits: torch.Tensor, temperature: torch.Tensor, floor: torch.Tensor, seeds: torch.Tensor,
                      positions: torch.Tensor, tokens: torch.Tensor, finished: torch.Tensor,
                      stops: torch.Tensor) -> None:
    batch, V = logits.shape
    _choose_kernel[(batch,)](logits, temperature, floor, seeds, positions, tokens, finished, stops, V,
                             logits.stride(0), N_STOPS=len(stops),
                             BLOCK_V=min(tuning.current("sample").block_v, triton.next_power_of_2(V)),
                             num_warps=8)


@_choose_tokens_op.register_fake
def _(logits, temperature, floor, seeds, positions, tokens, finished, stops):
    return None
