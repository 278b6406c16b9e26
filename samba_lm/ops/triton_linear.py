"""A few rows times a weight matrix, in Triton: the decode step's projections, a stream of the weights.

Layout (as `linear.py`): x [..., K] viewed as [M, K] rows with a unit last stride, M <= 64; weight
[N, K] contiguous (nn.Linear's), the same 16-bit dtype as x. One program per BLOCK_N outputs walks
K in BLOCK_K steps, a [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] tl.dot each (rows padded to BLOCK_M,
16 or 64), fp32 accumulation, software-pipelined loads (num_stages) so that several weight tiles are
in flight per SM: what streams the weights at the memory's rate is bytes in flight, not arithmetic.
Where N alone gives too few programs (d_model outputs from a long K: the MLP's down and Mamba's
out_proj), K is split as well, in one launch: each split writes an fp32 partial and counts itself in
on an arrival counter; the last split of a column block sums the partials in split order (the same
bits whichever finishes last) and re-arms the counter. cuBLAS's split-K adds a reduction launch
instead (48 per samba-1.7b step). The counters are shared by all calls on a device: calls run one after
another on one stream. Tiles per (M, N, K) come from `benchmarks/bench_linear.py` (H200):
`LinearTuning.tiles`; shapes where cuBLAS was faster are not in it and go to `F.linear`, as does everything with
gradients, under autocast, more rows, or other dtypes. What the reference covers that this does not:
all of that, and CPUs (except under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import tuning
from .triton_common import interpreting


@triton.jit
def _rows_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K, s_xm, s_ym, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr,
                 WIDEN: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Program (column block, K split): its share of K for BLOCK_N outputs. With SPLIT > 1 the last
    split of a column block to finish sums the others' fp32 partials, in split order."""
    col = tl.program_id(0)
    n = col * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    if SPLIT == 1:  # (a loop from 0 to K streams faster than one over a split's span)
        k_start, k_end = 0, K
    else:
        span = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
        k_start = tl.program_id(1) * span
        k_end = tl.minimum(k_start + span, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * s_xm + k[None, :], mask=(m < M)[:, None] & (k < K)[None, :], other=0.0)
        if EVEN:  # N and K multiples of the tile: the weight tiles need no masks
            w = tl.load(w_ptr + n[:, None] * K + k[None, :])
        else:
            w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=(n < N)[:, None] & (k < K)[None, :], other=0.0)
        if WIDEN:  # the interpreter's tl.dot mishandles 16-bit operands
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    out = (m < M)[:, None] & (n < N)[None, :]
    if SPLIT == 1:
        if HAS_BIAS:  # as F.linear: added to the fp32 product, rounded once
            acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + m[:, None] * s_ym + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out)
    else:
        parts = part_ptr + m[:, None] * N + n[None, :]  # [SPLIT, BLOCK_M, N], fp32
        tl.store(parts + tl.program_id(1) * BLOCK_M * N, acc, mask=out)
        tl.debug_barrier()  # all of this program's partials are written before it counts itself done
        if tl.atomic_add(count_ptr + col, 1, sem="acq_rel") == SPLIT - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT):  # a fixed order: the same sum whichever split came last
                total += tl.load(parts + s * BLOCK_M * N, mask=out, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + m[:, None] * s_ym + n[None, :], total.to(y_ptr.dtype.element_ty), mask=out)
            tl.atomic_xchg(count_ptr + col, 0)  # re-armed for the next call (and the next graph replay)


Tile = tuple[int, int, int, int, int]  # (BLOCK_N, BLOCK_K, num_warps, num_stages, K splits)


@tuning.register("linear")
@dataclass(frozen=True)
class LinearTuning(tuning.Tuning):
    """The few-rows kernel's tiles, and the shapes it takes from cuBLAS (`tuning.tuned(linear=...)`)."""

    tiles: Mapping[tuple[int, int, int], Tile] = tuning.table({
        (1, 2048, 8192): (64, 256, 4, 4, 4),
        (1, 8192, 2048): (64, 256, 4, 4, 1),
        (1, 2048, 4096): (64, 256, 4, 4, 4),
        (1, 2560, 2048): (32, 256, 4, 4, 1),
        (1, 2048, 2048): (16, 512, 4, 4, 1),
        (1, 50304, 2048): (32, 256, 4, 4, 1),
        (16, 2048, 8192): (64, 256, 4, 4, 4),
        (16, 8192, 2048): (64, 256, 4, 4, 1),
        (16, 2048, 4096): (64, 256, 4, 4, 4),
        (16, 2560, 2048): (32, 256, 4, 4, 1),
        (16, 2048, 2048): (16, 512, 4, 4, 1),
        (16, 50304, 2048): (32, 256, 4, 4, 1),
        (64, 2048, 8192): (32, 256, 4, 4, 2),
        (64, 2048, 4096): (32, 256, 4, 4, 2),
        (64, 2048, 2048): (16, 256, 4, 4, 1),
        # phi4-mini-flash (2026-12-02, `--models phi4-mini-flash --rows 1,16`; fc1 and x_proj: 128-wide K steps)
        (1, 20480, 2560): (64, 128, 4, 3, 1),
        (1, 2560, 10240): (32, 512, 4, 4, 1),
        (1, 2560, 5120): (32, 512, 4, 4, 1),
        (1, 192, 5120): (16, 128, 4, 4, 8),
        (1, 5120, 160): (64, 256, 4, 4, 1),
        (1, 2560, 2560): (32, 256, 4, 6, 1),
        (1, 200064, 2560): (64, 256, 4, 6, 1),
        (16, 20480, 2560): (64, 128, 4, 3, 1),
        (16, 2560, 10240): (32, 512, 4, 4, 1),
        (16, 2560, 5120): (32, 512, 4, 4, 1),
        (16, 192, 5120): (16, 128, 4, 4, 8),
        (16, 5120, 160): (64, 256, 4, 4, 1),
        (16, 2560, 2560): (32, 256, 4, 6, 1),
        (16, 200064, 2560): (64, 256, 4, 6, 1),
    })
    """Tiles by (row class, N, K), the row class 1, 16 (2 to 16 rows) or 64 (17 to 64); on a GPU only
    these shapes run the kernel, the others cuBLAS. H200, 2026-12-01, benchmarks/bench_linear.py: at 1
    and 16 rows ours beat cuBLAS on every shape but the MLP's gate_up (by 3 to 13%: cuBLAS's split-K
    reduction launches go), at 64 rows on the three with N = 2048. 1 and 16 rows share tiles, so a
    row's bits do not depend on how many rows come with it (up to 16). phi4-mini-flash, 2026-12-02: ours
    ahead on six of its nine shapes at 1 and 16 rows (x_proj 5.3 against 7.7 us, the MLP's fc2 18.0
    against 19.4, the tied head 245 against 258 at 16 rows), cuBLAS on fc1, in_proj and Wqkv; with K
    steps of 128 (sixth session) ours on fc1 too (29.3 against 31.5 us at 16 rows), x_proj 5.15; in_proj
    and Wqkv within 0.1 us of cuBLAS, left to it."""
    default_tile: Tile = (32, 256, 4, 4, 1)
    """For shapes not measured (under TRITON_INTERPRET=1, where every shape runs the kernel: tests)."""


MAX_ROWS = 64  # the kernel's limit, not a tuning choice: rows pad to 16 or 64 (`_bucket`)


def _bucket(M: int) -> int:
    """Rows padded for tl.dot."""
    return 16 if M <= 16 else 64


def row_class(M: int) -> int:
    return 1 if M == 1 else _bucket(M)


def rows_matmul(x2, weight, bias=None, tile=None):
    """[M, K] x [N, K]^T (+ bias [N]) -> [M, N], M <= 64, with the given tile or the table's (the default
    if none)."""
    M, K = x2.shape
    N = weight.shape[0]
    t = tuning.current("linear")
    block_n, block_k, warps, stages, split = tile or t.tiles.get((row_class(M), N, K), t.default_tile)
    split = max(1, min(split, triton.cdiv(K, block_k)))  # no split without a K tile of its own
    columns = triton.cdiv(N, block_n)
    y = x2.new_empty(M, N)
    parts = x2.new_empty(split, _bucket(M), N, dtype=torch.float32) if split > 1 else y
    _rows_kernel[(columns, split)](
        x2, weight, bias if bias is not None else y, y, parts, _counters(x2.device, columns) if split > 1 else y,
        M, N, K, x2.stride(0), y.stride(0),
        BLOCK_M=_bucket(M), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split,
        EVEN=N % block_n == 0 and K % block_k == 0, WIDEN=interpreting(), HAS_BIAS=bias is not None,
        num_warps=warps, num_stages=stages)
    return y


COUNTERS = 1 << 16
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-column-block arrival counters of the split-K kernels, zero between calls (each call's last
    split re-arms its own): one buffer per device, shared by every call on it."""
    if n > COUNTERS:
        raise ValueError(f"rows_matmul: {n} column blocks, more than the {COUNTERS} arrival counters")
    if device not in _COUNTERS:  # never reallocated: captured graphs keep its address
        _COUNTERS[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[device]


@torch.library.custom_op("samba_lm::rows_matmul", mutates_args=())
def _rows_matmul_op(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return rows_matmul(x2, weight, bias)


@_rows_matmul_op.register_fake
def _(x2, weight, bias):
    return x2.new_empty(x2.shape[0], weight.shape[0])


def linear_triton(x, weight, bias=None):
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    eligible = (0 < M <= MAX_ROWS and x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16)
                and weight.is_contiguous() and (bias is None or bias.is_contiguous())
                and not torch.is_autocast_enabled(x.device.type)
                and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))))
    measured = (row_class(M), weight.shape[0], K) in tuning.current("linear").tiles
    if not eligible or not (measured or interpreting()):
        return F.linear(x, weight, bias)
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return _rows_matmul_op(x2, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
