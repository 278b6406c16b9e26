"""The LM head and its loss in one op: cross-entropy of (x @ weight^T) without the full logits.

Shapes (N tokens, D = d_model, V = vocab):
    x [..., D] (flattened to [N, D])   weight [V, D] (the tied embedding or lm_head)
    targets [...] = x's leading dims, int64 in [0, V) or ignore_index   -> loss

    nll_n = logsumexp(x_n @ weight^T) - (x_n @ weight^T)[targets_n]   (0 where targets_n == ignore_index)
    reduction "mean" (default): sum of nll / the number of valid targets, a 0-dim tensor;
              "sum": sum of nll, a 0-dim tensor;  "none": nll itself, shaped like targets

equal to `F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index,
reduction=reduction)` (float64 for float64 inputs; "mean" with no valid target gives NaN, as there).
The tokens go through in chunks of `chunk_tokens`: a chunk's logits are x_c @ weight^T in the matmul
dtype F.linear would use (autocast's, else x's), reduced row by row to their logsumexp and target logit
in at least float32; only the N losses are kept. The gradient of a chunk is (softmax - one-hot) * (each
token's incoming gradient), giving dx_c = g @ weight and adding g^T @ x_c to dweight (accumulated in
float32, by the matmul itself on CUDA; cast to weight's dtype at the end). For "mean" and "sum" the incoming gradient is one number,
so the forward computes the gradients while each chunk's logits are at hand (for an incoming 1: 1 /
n_valid per token for "mean") and the backward only scales them by it: three matmuls per chunk, not
four. For "none" (one gradient per token) the backward recomputes each chunk's logits.
Memory is O(chunk_tokens * V) plus a weight-sized gradient, never [N, V]: at B8 T4096 V32000 the full
float32 logits would be 4.2 GB, and as much again for their gradient. The "none" losses are what
streaming evaluation reads (`SambaLM(..., labels=...).losses`, `eval ppl`); `return_losses=True` gives
them beside a "mean" or "sum" loss, without a gradient. With no gradient to compute, the same forward
runs outside the autograd Function, whose context would hold Python memory per call until a gc pass (a
long `eval ppl` stream makes thousands of calls).

Default chunk: 2**26 // V tokens (at least 1), so that a chunk's float32 logits hold at most 2**26
elements = 256 MB (2097 tokens at V = 32000); the log-softmax's temporaries are the same size.

The chunked algorithm is shared by the backends; they differ in the row step (logsumexp, nll and the
gradient written over the chunk's logits): torch ops in the "reference" backend (any device and dtype;
the tests compare it with F.cross_entropy of the full logits in float64), one Triton kernel per chunk in
"triton" (`triton_cross_entropy.py`), which never makes a float32 copy of the logits.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import dispatch
from ._checks import check_projection, compute_dtype
from .linear import autocast_dtype

CHUNK_ELEMENTS = 2**26  # float32 logits per chunk: 256 MB
REDUCTIONS = ("mean", "sum", "none")


def default_chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def _no_autocast(device: torch.device):
    """The matmuls cast explicitly to the head's matmul dtype, whatever autocast the caller has on."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(x, weight) would compute in: autocast's (which leaves float64 alone), else x's."""
    return autocast_dtype(x) or x.dtype


def _rows_reference(logits, targets, scale, ignore_index):
    """Each row's (logsumexp, nll) in at least float32, 0 nll at ignored targets; with a scale (one
    number, or one per row), the rows' gradients (softmax - onehot) * scale (0 at ignored targets)
    written over logits. The Triton backend's kernel does the same in one pass over the logits."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(wide, dim=-1)
    nll = torch.where(valid, lse - wide.gather(1, safe[:, None]).squeeze(1), 0)
    if scale is not None:
        g = wide.sub_(lse[:, None]).exp_()  # softmax (over logits itself when already wide)
        g[torch.arange(g.shape[0], device=g.device), safe] -= 1
        g.mul_(torch.where(valid, scale.expand(valid.shape), 0)[:, None])
        if g is not logits:
            logits.copy_(g)
    return lse, nll


def _chunks(rows, x, weight, targets, ignore_index, chunk, mm, scale=None, dx=None, dw=None):
    """Each token's nll (0 at ignored targets), chunk by chunk: the chunk's logits x_c @ weight^T in the
    matmul dtype mm, then `rows` over them. With a scale, rows leaves the chunk's gradient in the logits
    buffer, and the two gradient matmuls add it into dx (x's dtype) and dw (float32 or float64)."""
    nll = torch.empty(x.shape[0], dtype=compute_dtype(x.dtype), device=x.device)
    with _no_autocast(x.device):
        w = weight.to(mm)
        for s in range(0, x.shape[0], chunk):
            xc = x[s:s + chunk].to(mm)
            logits = F.linear(xc, w)
            part = scale if scale is None or scale.numel() == 1 else scale[s:s + chunk]
            nll[s:s + chunk] = rows(logits, targets[s:s + chunk], part, ignore_index)[1]
            if dx is not None:
                dx[s:s + chunk] = logits @ w
            if dw is not None:
                _add_product(dw, logits.t(), xc)
    return nll


def _add_product(acc, a, b):
    """acc += a @ b with acc wider than a and b: on CUDA the matmul accumulates into acc itself
    (cuBLAS with beta = 1); elsewhere through a product rounded to a's dtype, then added."""
    if acc.is_cuda and acc.dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += (a @ b).to(acc.dtype)


def _reduce(nll, n_valid, reduction):
    if reduction == "none":
        return nll
    return nll.sum() / n_valid if reduction == "mean" else nll.sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """For "mean" and "sum" the incoming gradient is one number, so the forward computes the gradients
    at once (for an incoming 1, as each chunk's logits are at hand) and the backward only scales them:
    three matmuls per chunk instead of four. For "none" the backward recomputes each chunk's logits
    and weighs each token by its own incoming gradient. Outputs: the loss, and for "mean" and "sum"
    also each token's nll, not differentiable."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, chunk, reduction, rows):
        mm, valid = _matmul_dtype(x), targets != ignore_index
        n_valid = valid.sum()
        want_x, want_w = ctx.needs_input_grad[:2]
        ctx.early, ctx.reduction, ctx.rows, ctx.chunk, ctx.ignore_index, ctx.mm = (
            reduction != "none", reduction, rows, chunk, ignore_index, mm)
        if not ctx.early:
            nll = _chunks(rows, x, weight, targets, ignore_index, chunk, mm)
            ctx.save_for_backward(x, weight, targets)
            return nll
        wide = compute_dtype(x.dtype)
        scale = (1 / n_valid.to(wide) if reduction == "mean" else torch.ones((), dtype=wide, device=x.device))
        dx = torch.empty_like(x) if want_x else None
        dw = torch.zeros(weight.shape, dtype=compute_dtype(weight.dtype), device=weight.device) if want_w else None
        nll = _chunks(rows, x, weight, targets, ignore_index, chunk, mm, scale.reshape(1), dx, dw)
        ctx.save_for_backward(dx, dw)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(nll)
        return _reduce(nll, n_valid, reduction), nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, *_):
        if ctx.early:
            dx, dw = ctx.saved_tensors
            return (dx * grad if dx is not None else None,  # a 0-dim grad keeps dx's dtype
                    (dw * grad).to(ctx.weight_dtype) if dw is not None else None, None, None, None, None, None)
        x, weight, targets = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad[:2]
        dx = torch.empty_like(x) if want_x else None
        dw = torch.zeros(weight.shape, dtype=compute_dtype(weight.dtype), device=weight.device) if want_w else None
        _chunks(ctx.rows, x, weight, targets, ctx.ignore_index, ctx.chunk, ctx.mm, grad, dx, dw)
        return dx, dw.to(weight.dtype) if want_w else None, None, None, None, None, None


def linear_cross_entropy_with(rows, x, weight, targets, ignore_index, chunk_tokens, reduction, return_losses):
    """The op over the loss rows `rows` (the reference's torch ops, or a backend's kernel)."""
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    flat = (x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1), ignore_index, chunk)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        out = _LinearCrossEntropy.apply(*flat, reduction, rows)
        out, nll = (out, out) if reduction == "none" else out
    else:  # no backward (evaluation): an autograd Function's context costs Python memory until a gc pass
        x2, w, t, ignore_index, chunk = flat
        nll = _chunks(rows, x2, w, t, ignore_index, chunk, _matmul_dtype(x2))
        out = _reduce(nll, (t != ignore_index).sum(), reduction)
    losses = nll.reshape(targets.shape)
    if reduction == "none":
        out = losses
    return (out, losses) if return_losses else out


def linear_cross_entropy_reference(x, weight, targets, ignore_index=-100, chunk_tokens=None, reduction="mean",
                                   return_losses=False):
    return linear_cross_entropy_with(_rows_reference, x, weight, targets, ignore_index, chunk_tokens, reduction,
                                     return_losses)


def linear_cross_entropy(x, weight, targets, ignore_index=-100, chunk_tokens=None, reduction="mean",
                         return_losses=False):
    """Cross-entropy of the logits x @ weight^T against targets, chunked (see module docstring).

    chunk_tokens: tokens per chunk (default `default_chunk_tokens(V)`, 256 MB of float32 logits).
    reduction: "mean" (default) or "sum" over the valid targets, a 0-dim tensor; "none": each token's
    loss, shaped like targets, 0 where targets == ignore_index (as F.cross_entropy).
    return_losses: also return each token's loss, shaped like targets: (loss, losses). With "mean" or
    "sum" they carry no gradient (the loss does); with "none" they are the loss itself."""
    op = "linear_cross_entropy"
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    check_projection(op, x, weight, "[V, D]")
    if x.device != weight.device:
        raise ValueError(f"{op}: x is on {x.device} but weight on {weight.device}")
    if x.dtype != weight.dtype and autocast_dtype(x) is None:
        raise ValueError(f"{op}: x ({x.dtype}) and weight ({weight.dtype}) must have one dtype outside autocast")
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64:
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"{op}: targets must be an int64 tensor of token ids, got {got}")
    if tuple(targets.shape) != tuple(x.shape[:-1]) or targets.device != x.device:
        raise ValueError(f"{op}: targets must have x's leading dims {tuple(x.shape[:-1])} on {x.device}, "
                         f"got {tuple(targets.shape)} on {targets.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"{op}: chunk_tokens must be an int >= 1 or None (the default), got {chunk_tokens!r}")
    if not isinstance(return_losses, bool):
        raise ValueError(f"{op}: return_losses must be a bool, got {return_losses!r}")
    _check_targets(op, targets, ignore_index, weight.shape[0])
    fn = dispatch.resolve(op, x.device, x.dtype)
    return fn(x, weight, targets, ignore_index, chunk_tokens, reduction, return_losses)


def _check_targets(op: str, targets: torch.Tensor, ignore_index: int, vocab: int):
    """Targets in [0, V) or ignore_index: a ValueError on a CPU, a device-side assertion elsewhere (no
    host sync); skipped while compiling."""
    if torch.compiler.is_compiling() or targets.numel() == 0:
        return
    message = f"{op}: targets must lie in [0, V={vocab}) or equal ignore_index={ignore_index}"
    ok = ((targets >= 0) & (targets < vocab)) | (targets == ignore_index)
    if targets.device.type == "cpu":
        if not ok.all():
            bad = targets[~ok]
            raise ValueError(f"{message}, got values in [{bad.min().item()}, {bad.max().item()}]")
    elif targets.device.type != "meta":
        torch._assert_async(ok.all(), message)


dispatch.register("linear_cross_entropy", "reference", linear_cross_entropy_reference)
