"""A few rows times a weight matrix, in Triton: the decode step's projections, a stream of the weights.

Layout (as `linear.py`): x [..., K] viewed as [M, K] rows with a unit last stride, M <= 64; weight
[N, K] contiguous (nn.Linear's), the same 16-bit dtype as x. One program per BLOCK_N outputs walks
K in BLOCK_K steps, a [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] tl.dot each (rows padded to BLOCK_M,
16 or 64), fp32 accumulation, software-pipelined loads (num_stages) so that several weight tiles are
in flight per SM: what streams the weights at the memory's rate is bytes in flight, not arithmetic.
No split over K, so no second pass: cuBLAS's split-K kernels for these shapes add a reduction launch
each (48 per samba-1.7b step). Tiles per (M, N, K) come from `benchmarks/bench_linear.py` (H200):
`TILES`; shapes where cuBLAS was faster are not in it and go to `F.linear`, as does everything with
gradients, under autocast, more rows, or other dtypes. What the reference covers that this does not:
all of that, and CPUs (except under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _rows_kernel(x_ptr, w_ptr, y_ptr, M, N, K, s_xm, s_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN: tl.constexpr, WIDEN: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
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
    tl.store(y_ptr + m[:, None] * s_ym + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=(m < M)[:, None] & (n < N)[None, :])


# (BLOCK_N, BLOCK_K, num_warps, num_stages) by (row class, N, K), the row class 1, 16 (2 to 16 rows)
# or 64 (17 to 64); see the module docstring.
# H200, 2026-12-01: at 1 and 16 rows ours beat cuBLAS on every shape but the MLP's gate_up (by 3 to 13%:
# cuBLAS's split-K reduction launches go), at 64 rows only on the two smallest.
TILES: dict[tuple[int, int, int], tuple[int, int, int, int]] = {
    (1, 2048, 8192): (16, 512, 4, 4),
    (1, 8192, 2048): (64, 256, 4, 4),
    (1, 2048, 4096): (16, 512, 4, 4),
    (1, 2560, 2048): (32, 256, 4, 4),
    (1, 2048, 2048): (16, 512, 4, 4),
    (1, 50304, 2048): (32, 256, 4, 4),
    (16, 2048, 8192): (16, 512, 4, 4),
    (16, 8192, 2048): (64, 256, 4, 4),
    (16, 2048, 4096): (16, 512, 4, 4),
    (16, 2560, 2048): (32, 256, 4, 4),
    (16, 2048, 2048): (16, 512, 4, 4),
    (16, 50304, 2048): (32, 256, 4, 4),
    (64, 2048, 4096): (16, 256, 4, 4),
    (64, 2048, 2048): (16, 256, 4, 4),
}
DEFAULT_TILE = (32, 256, 4, 4)  # for shapes not measured (tests, other models)
MAX_ROWS = 64


def _bucket(M: int) -> int:
    """Rows padded for tl.dot."""
    return 16 if M <= 16 else 64


def row_class(M: int) -> int:
    return 1 if M == 1 else _bucket(M)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def rows_matmul(x2, weight, tile=None):
    """[M, K] x [N, K]^T -> [M, N], M <= 64, with the given tile or the table's (the default if none)."""
    M, K = x2.shape
    N = weight.shape[0]
    block_n, block_k, warps, stages = tile or TILES.get((row_class(M), N, K), DEFAULT_TILE)
    y = x2.new_empty(M, N)
    _rows_kernel[(triton.cdiv(N, block_n),)](
        x2, weight, y, M, N, K, x2.stride(0), y.stride(0), BLOCK_M=_bucket(M), BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN=N % block_n == 0 and K % block_k == 0, WIDEN=_interpreting(), num_warps=warps, num_stages=stages)
    return y


@torch.library.custom_op("samba_lm::rows_matmul", mutates_args=())
def _rows_matmul_op(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return rows_matmul(x2, weight)


@_rows_matmul_op.register_fake
def _(x2, weight):
    return x2.new_empty(x2.shape[0], weight.shape[0])


def linear_triton(x, weight):
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    eligible = (0 < M <= MAX_ROWS and x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16)
                and weight.is_contiguous() and not torch.is_autocast_enabled(x.device.type)
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))
    if not eligible or (not _interpreting() and (row_class(M), weight.shape[0], K) not in TILES):
        return F.linear(x, weight)
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return _rows_matmul_op(x2, weight).reshape(*x.shape[:-1], weight.shape[0])
