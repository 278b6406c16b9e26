"""The LM head and its loss in one op: cross-entropy of (x @ weight^T) without the full logits.

Shapes (N tokens, D = d_model, V = vocab):
    x [..., D] (flattened to [N, D])   weight [V, D] (the tied embedding or lm_head)
    targets [...] = x's leading dims, int64 in [0, V) or ignore_index   -> loss

    nll_n = logsumexp(x_n @ weight^T) - (x_n @ weight^T)[targets_n]   (0 where targets_n == ignore_index)
    reduction "mean" (default): sum of nll / the number of valid targets, a 0-dim tensor;
              "sum": sum of nll, a 0-dim tensor;  "none": nll itself, shaped like targets

equal to `F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index,
reduction=reduction)` (float64 for float64 inputs; "mean" with no valid target gives NaN, as there).
The tokens go through in chunks of `chunk_tokens`: a chunk's logits are computed by `F.linear` (so
under autocast the matmul runs in the autocast dtype, as the head's would), cast to float32 and reduced
to their logsumexp and target logit; only those N numbers are kept. The backward recomputes each
chunk's logits and turns them into (softmax - one-hot) * (each token's incoming gradient: grad /
n_valid for "mean", grad for "sum", grad_n for "none"), giving that chunk's dx = g @ weight and adding
g^T @ x_chunk to dweight (accumulated in float32, cast to weight's dtype at the end), under the
forward's autocast state. Memory is O(chunk_tokens * V) plus a weight-sized gradient, never [N, V]: at
B8 T4096 V32000 the full float32 logits would be 4.2 GB, and as much again for their gradient.
"none" is what streaming evaluation uses (`SambaLM(..., labels=...).losses`, `eval ppl`). With no
gradient to compute, the same forward runs outside the autograd Function, whose context would hold
Python memory per call until a gc pass (a long `eval ppl` stream makes thousands of calls).

Default chunk: 2**26 // V tokens (at least 1), so that a chunk's float32 logits hold at most 2**26
elements = 256 MB (2097 tokens at V = 32000); the log-softmax's temporaries are the same size.

This chunked autograd function is the algorithm itself, registered as the "reference" backend: there
is no separate unfused reference (the tests compare it with F.cross_entropy of the full logits).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import dispatch
from ._checks import check_projection, compute_dtype

CHUNK_ELEMENTS = 2**26  # float32 logits per chunk: 256 MB
REDUCTIONS = ("mean", "sum", "none")


def default_chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def _autocasting(device: torch.device) -> bool:
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def _no_autocast(device: torch.device):
    """The backward casts explicitly to the forward's matmul dtype, whatever autocast the caller has on."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _chunked_nll(x, weight, targets, ignore_index, chunk):
    """Each token's loss (0 at ignored targets) and logsumexp, the chunk's logits freed as it goes; and
    the matmul dtype (autocast's, or x's)."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.empty(x.shape[0], dtype=compute_dtype(x.dtype), device=x.device)
    nll = torch.empty_like(lse)  # N numbers, kept for every reduction: as small as lse
    mm = x.dtype
    for s in range(0, x.shape[0], chunk):
        logits = F.linear(x[s:s + chunk], weight)
        mm = logits.dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        lse_c = torch.logsumexp(logits, dim=-1)
        target = logits.gather(1, safe[s:s + chunk, None]).squeeze(1)
        lse[s:s + chunk] = lse_c
        nll[s:s + chunk] = torch.where(valid[s:s + chunk], lse_c - target, 0)
        del logits
    return nll, lse, safe, valid, mm


def _reduce(nll, valid, reduction):
    if reduction == "none":
        return nll
    return nll.sum() / valid.sum() if reduction == "mean" else nll.sum()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, chunk, reduction):
        nll, lse, safe, valid, ctx.mm = _chunked_nll(x, weight, targets, ignore_index, chunk)
        ctx.save_for_backward(x, weight, safe, valid, lse, valid.sum())
        ctx.chunk, ctx.reduction = chunk, reduction
        return _reduce(nll, valid, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, safe, valid, lse, n_valid = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad[:2]
        dx = torch.empty_like(x) if want_x else None
        dw = torch.zeros(weight.shape, dtype=compute_dtype(weight.dtype), device=weight.device) if want_w else None
        # Each token's incoming gradient: one number for "mean" / "sum", one per token for "none".
        scale, mm = (grad / n_valid if ctx.reduction == "mean" else grad).to(lse.dtype), ctx.mm
        per_token = ctx.reduction == "none"
        with _no_autocast(x.device):
            w = weight.to(mm)
            for s in range(0, x.shape[0], ctx.chunk):
                xc = x[s:s + ctx.chunk].to(mm)
                g = F.linear(xc, w).to(lse.dtype).sub_(lse[s:s + ctx.chunk, None]).exp_()  # softmax
                g[torch.arange(g.shape[0], device=g.device), safe[s:s + ctx.chunk]] -= 1
                row_scale = scale[s:s + ctx.chunk] if per_token else scale
                g = g.mul_(torch.where(valid[s:s + ctx.chunk], row_scale, 0)[:, None]).to(mm)
                if want_x:
                    dx[s:s + ctx.chunk] = g @ w
                if want_w:
                    dw += (g.t() @ xc).to(dw.dtype)
        return dx, dw.to(weight.dtype) if want_w else None, None, None, None, None


def linear_cross_entropy_reference(x, weight, targets, ignore_index=-100, chunk_tokens=None, reduction="mean"):
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    args = (x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1), ignore_index, chunk)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        out = _LinearCrossEntropy.apply(*args, reduction)
    else:  # no backward (evaluation): an autograd Function's context costs Python memory until a gc pass
        nll, _, _, valid, _ = _chunked_nll(*args)
        out = _reduce(nll, valid, reduction)
    return out.reshape(targets.shape) if reduction == "none" else out


def linear_cross_entropy(x, weight, targets, ignore_index=-100, chunk_tokens=None, reduction="mean"):
    """Cross-entropy of the logits x @ weight^T against targets, chunked (see module docstring).

    chunk_tokens: tokens per chunk (default `default_chunk_tokens(V)`, 256 MB of float32 logits).
    reduction: "mean" (default) or "sum" over the valid targets, a 0-dim tensor; "none": each token's
    loss, shaped like targets, 0 where targets == ignore_index (as F.cross_entropy)."""
    op = "linear_cross_entropy"
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    check_projection(op, x, weight, "[V, D]")
    if x.device != weight.device:
        raise ValueError(f"{op}: x is on {x.device} but weight on {weight.device}")
    if x.dtype != weight.dtype and not _autocasting(x.device):
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
    _check_targets(op, targets, ignore_index, weight.shape[0])
    fn = dispatch.resolve(op, x.device, x.dtype)
    return fn(x, weight, targets, ignore_index, chunk_tokens, reduction)


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
