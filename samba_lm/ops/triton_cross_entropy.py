"""The loss rows of `linear_cross_entropy` in Triton: one kernel per chunk of the head's logits.

For each row n of logits [n, V] (the head's matmul output, in its dtype, last dim contiguous) and its
target t_n: lse_n = logsumexp(logits_n) and nll_n = lse_n - logits_n[t_n] (0 where t_n == ignore_index),
in fp32. With a scale (one number, or one per row), the row's gradient (softmax_n - onehot(t_n)) *
scale_n (0 at an ignored target) overwrites the logits in place, rounded once to their dtype, ready
for the head's two gradient matmuls. That is two reads and one write of the logits; the torch ops it
replaces cast them to fp32 and pass over them six times.

One program per row walks V in BLOCK_V lanes, keeping a running max and sum of exponentials per lane
(exp2 of differences times log2(e)) and merging the lanes at the end; a second walk writes the gradient.
What the reference (`linear_cross_entropy._rows_reference`) covers that this does not: float64, CPUs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_cross_entropy import linear_cross_entropy_with
from .triton_common import row_stride


@triton.jit
def _ce_rows_kernel(logits_ptr, stride, targets_ptr, scale_ptr, scale_stride, lse_ptr, nll_ptr, V, ignore_index,
                    GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: rows * V passes 2^31 in a large chunk
    base = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    safe = tl.where(valid, target, 0)
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per lane
    s = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with nothing yet: no -inf - -inf
        # Subtract first, then scale by log2(e): scaling a large logit first would cost its low bits.
        s = s * tl.exp2((m - shift) * 1.4426950408889634) + tl.exp2((x - shift) * 1.4426950408889634)
        m = m_new
    top = tl.max(m, axis=0)
    lse = top + tl.log2(tl.sum(s * tl.exp2((m - top) * 1.4426950408889634), axis=0)) * 0.6931471805599453
    picked = tl.load(base + safe).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(nll_ptr + row, tl.where(valid, lse - picked, 0.0))
    if GRAD:
        scale = tl.where(valid, tl.load(scale_ptr + row * scale_stride).to(tl.float32), 0.0)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + cols
            x = tl.load(base + idx, mask=idx < V, other=0.0).to(tl.float32)
            p = tl.exp2((x - lse) * 1.4426950408889634)
            g = tl.where(idx == safe, p - 1.0, p) * scale
            tl.store(base + idx, g.to(logits_ptr.dtype.element_ty), mask=idx < V)


def _outputs(logits):
    """lse and nll [n] in fp32: the launcher's outputs, also the fake implementation's."""
    return (logits.new_empty(logits.shape[0], dtype=torch.float32),
            logits.new_empty(logits.shape[0], dtype=torch.float32))


def cross_entropy_rows(logits, targets, scale, ignore_index):
    """(lse, nll) of each row; with a scale, the rows' gradients written over logits (see module)."""
    if logits.stride(-1) != 1:
        raise ValueError("cross_entropy_rows: logits need a contiguous last dim")
    lse, nll = _outputs(logits)
    n, V = logits.shape
    if n == 0:
        return lse, nll
    block = min(4096, triton.next_power_of_2(V))
    grad = scale is not None
    scale_arg = scale if grad else lse
    scale_stride = scale.stride(0) if grad and scale.numel() > 1 else 0
    _ce_rows_kernel[(n,)](logits, logits.stride(0), row_stride(targets), scale_arg, scale_stride, lse, nll, V,
                          ignore_index, GRAD=grad, BLOCK_V=block, num_warps=8 if block >= 2048 else 4)
    return lse, nll


@torch.library.custom_op("samba_lm::cross_entropy_rows", mutates_args=("logits",))
def _rows_op(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None,
             ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    return cross_entropy_rows(logits, targets, scale, ignore_index)


@_rows_op.register_fake
def _(logits, targets, scale, ignore_index):
    return _outputs(logits)


def linear_cross_entropy_triton(x, weight, targets, ignore_index=-100, chunk_tokens=None, reduction="mean",
                                return_losses=False):
    return linear_cross_entropy_with(_rows_op, x, weight, targets, ignore_index, chunk_tokens, reduction, return_losses)
