"""`choose_tokens` in Triton: each row's vocabulary in splits, a program per (row, split) walking its
slice in blocks with a running argmax, then one program per row taking the best of its splits.

Layout (as `sample.py`): logits [B, V] with the vocabulary contiguous; the per-row settings [B]; tokens
[B, 1] contiguous, updated in place with finished. The hash is the reference's, in int64 arithmetic
holding 32-bit values (products wrap mod 2^64; their low 32 bits are the 32-bit products), so the noise
bits match it exactly. Two launches replace about ten (scaling, noise, mask, argmax, the finished
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
from .triton_common import multiprocessors

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
def _choose_split_kernel(logits_ptr, temp_ptr, floor_ptr, seed_ptr, pos_ptr, best_ptr, index_ptr, V, s_lb, per_split,
                         BLOCK_V: tl.constexpr):
    """Program (row, split): the best score of its slice of the vocabulary and the smallest index
    holding it, into the [B, SPLITS] partials."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    t = tl.load(temp_ptr + b)
    floor = tl.load(floor_ptr + b)
    hot = t > 0
    t = tl.where(hot, t, 1.0)
    seed = tl.load(seed_ptr + b)
    key = _mix32((seed & 0xFFFFFFFF) ^ _mix32(((seed >> 32) & 0xFFFFFFFF) ^ SALT))
    key = _mix32(key ^ (tl.load(pos_ptr + b) & 0xFFFFFFFF))
    lo = split * per_split
    hi = tl.minimum(lo + per_split, V)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_v = tl.zeros([BLOCK_V], tl.int64)
    for v0 in range(lo, hi, BLOCK_V):  # per lane, the best so far; strict > keeps the earliest on ties
        v = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(logits_ptr + b * s_lb + v, mask=v < hi, other=float("-inf")).to(tl.float32)
        if hot:
            bits = _mix32(key ^ _mix32(v.to(tl.int64)))
            u = ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24
            # div_rn: IEEE division as torch's (Triton's `/` is approximate), the reference's scores exactly
            score = tl.where(x >= floor, tl.div_rn(x, t) - tl.log(-tl.log(u)), float("-inf"))
        else:
            score = x
        score = tl.where(v < hi, score, float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_v = tl.where(better, v.to(tl.int64), best_v)
    top = tl.max(best, axis=0)
    row = b * tl.num_programs(1) + split
    tl.store(best_ptr + row, top)
    tl.store(index_ptr + row, tl.min(tl.where(best == top, best_v, V), axis=0))  # the smallest among the maxima


@triton.jit
def _choose_merge_kernel(best_ptr, index_ptr, tok_ptr, fin_ptr, stop_ptr, n_splits, V, N_STOPS: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    """Program (row): the best of its splits (the smallest index among equal scores, so the choice is
    the same for any split count), then the finished rows and the stop tokens."""
    b = tl.program_id(0)
    sp = tl.arange(0, BLOCK_S)
    sm = sp < n_splits
    best = tl.load(best_ptr + b * n_splits + sp, mask=sm, other=float("-inf"))
    index = tl.load(index_ptr + b * n_splits + sp, mask=sm, other=V)
    chosen = tl.min(tl.where(sm & (best == tl.max(best, axis=0)), index, V), axis=0)
    done = tl.load(fin_ptr + b) != 0
    token = tl.where(done, tl.load(tok_ptr + b), chosen)
    stops = tl.load(stop_ptr + tl.arange(0, N_STOPS))
    tl.store(tok_ptr + b, token)
    tl.store(fin_ptr + b, (done | (tl.sum((stops == token).to(tl.int32), axis=0) > 0)).to(tl.int1))


@tuning.register("sample")
@dataclass(frozen=True)
class SampleTuning(tuning.Tuning):
    """The token choice's tiles (`tuning.tuned(sample=...)`)."""

    block_v: int = 2048
    """Vocabulary entries per step of a split's walk (the choice is the same at any size: ties go to the
    smallest index)."""
    programs_per_sm: int = 2
    """Splits of each row's vocabulary are added until B * SPLITS reaches this many programs per SM: one
    program a row walking phi4-mini-flash's 200,064 entries took 44 / 46 us a step at batch 1 / 16,
    split 7 us at batch 16 (H200, decode profiles)."""
    max_splits: int = 128


def _splits(t: SampleTuning, batch: int, V: int, device) -> tuple[int, int]:
    """(entries per split, a multiple of block_v; number of splits): the same for every step of a shape."""
    blocks = triton.cdiv(V, t.block_v)
    wanted = min(blocks, t.max_splits, max(1, triton.cdiv(t.programs_per_sm * multiprocessors(device), batch)))
    per_split = triton.cdiv(blocks, wanted) * t.block_v
    return per_split, triton.cdiv(V, per_split)


@torch.library.custom_op("samba_lm::choose_tokens", mutates_args=("tokens", "finished"))
def _choose_tokens_op(logits: torch.Tensor, temperature: torch.Tensor, floor: torch.Tensor, seeds: torch.Tensor,
                      positions: torch.Tensor, tokens: torch.Tensor, finished: torch.Tensor,
                      stops: torch.Tensor) -> None:
    batch, V = logits.shape
    t = tuning.current("sample")
    per_split, n_splits = _splits(t, batch, V, logits.device)
    best = logits.new_empty(batch, n_splits, dtype=torch.float32)
    index = logits.new_empty(batch, n_splits, dtype=torch.int64)
    _choose_split_kernel[(batch, n_splits)](logits, temperature, floor, seeds, positions, best, index, V,
                                            logits.stride(0), per_split,
                                            BLOCK_V=min(t.block_v, triton.next_power_of_2(V)), num_warps=8)
    _choose_merge_kernel[(batch,)](best, index, tokens, finished, stops, n_splits, V, N_STOPS=len(stops),
                                   BLOCK_S=triton.next_power_of_2(n_splits), num_warps=1)


@_choose_tokens_op.register_fake
def _(logits, temperature, floor, seeds, positions, tokens, finished, stops):
    return None


def choose_tokens_triton(logits, temperature, floor, seeds, positions, tokens, finished, stops):
    batch, V = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    n_stops = triton.next_power_of_2(len(stops))
    if n_stops != len(stops):  # pad with -1 (no token): the kernel reads a power of two
        stops = torch.cat([stops, stops.new_full((n_stops - len(stops),), -1)])
    _choose_tokens_op(logits, temperature, floor, seeds, positions, tokens, finished, stops)
    return tokens.view(-1)
