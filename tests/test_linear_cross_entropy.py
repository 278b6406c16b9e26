"""ops.linear_cross_entropy: the chunked head + loss against the full logits (each reduction), and
SambaLM(labels=...) with and without a state."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import small_model
from torch.utils._python_dispatch import TorchDispatchMode

from samba_lm import ops
from samba_lm.ops import dispatch
from samba_lm.ops.linear_cross_entropy import default_chunk_tokens


def unchunked(x, weight, targets, ignore_index=-100, reduction="mean"):
    """The plain computation the op must equal: the full [N, V] logits, then F.cross_entropy."""
    logits = F.linear(x, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    out = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index, reduction=reduction)
    return out.reshape(targets.shape) if reduction == "none" else out


def inputs(N=11, D=6, V=13, dtype=torch.float64, ignored=()):
    x = torch.randn(N, D, dtype=dtype, requires_grad=True)
    w = torch.randn(V, D, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[list(ignored)] = -100
    return x, w, t


def value_and_grads(fn, x, w, t, **kw):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(x, w, t, **kw)
    loss.backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 3, 11, 40, None])
@pytest.mark.parametrize("ignored", [(), (0, 4, 5, 10)])
def test_matches_full_logits_in_float64(chunk, ignored):
    x, w, t = inputs(ignored=ignored)
    got = value_and_grads(ops.linear_cross_entropy, x, w, t, chunk_tokens=chunk)
    want = value_and_grads(unchunked, x, w, t)
    assert got[0].dtype == torch.float64
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_sum_and_none_match_full_logits_in_float64(reduction, chunk):
    """Values and gradients; for "none" a different gradient per token (and 0 at the ignored ones)."""
    x, w, t = inputs(ignored=(0, 4, 5, 10))
    weights = torch.rand(t.shape, dtype=torch.float64) if reduction == "none" else 1.0

    def weighted(fn):
        return lambda x, w, t, **kw: (fn(x, w, t, reduction=reduction, **kw) * weights).sum()

    got = value_and_grads(weighted(ops.linear_cross_entropy), x, w, t, chunk_tokens=chunk)
    want = value_and_grads(weighted(unchunked), x, w, t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    out = ops.linear_cross_entropy(x, w, t, chunk_tokens=chunk, reduction=reduction)
    torch.testing.assert_close(out, unchunked(x, w, t, reduction=reduction), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # no backward: the same numbers without the autograd Function
        torch.testing.assert_close(ops.linear_cross_entropy(x, w, t, chunk_tokens=chunk, reduction=reduction), out)
    if reduction == "none":
        assert out.shape == t.shape and torch.all(out[[0, 4, 5, 10]] == 0)


def test_none_keeps_the_leading_dims_and_gradchecks():
    x, w, t = inputs(N=6, D=3, V=4, ignored=(2,))
    x3, t3 = x.detach().reshape(2, 3, 3).requires_grad_(), t.reshape(2, 3)
    out = ops.linear_cross_entropy(x3, w, t3, chunk_tokens=4, reduction="none")
    assert out.shape == (2, 3) and out.dtype == torch.float64
    torch.testing.assert_close(out, unchunked(x3, w, t3, reduction="none"), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, w: ops.linear_cross_entropy(x, w, t3, chunk_tokens=4, reduction="none"), (x3, w))
    all_ignored = torch.full_like(t, -100)
    assert ops.linear_cross_entropy(x, w, all_ignored, reduction="sum").item() == 0  # as F.cross_entropy
    assert torch.all(ops.linear_cross_entropy(x, w, all_ignored, reduction="none") == 0)


def test_leading_dims_and_another_ignore_index():
    x, w, t = inputs(N=12)
    x3, t3 = x.detach().reshape(3, 4, 6).requires_grad_(), t.clone().reshape(3, 4)
    t3[1, 2] = 7
    loss = ops.linear_cross_entropy(x3, w, t3, ignore_index=7, chunk_tokens=5)
    torch.testing.assert_close(loss, unchunked(x3, w, t3, ignore_index=7), rtol=1e-12, atol=1e-12)
    loss.backward()
    assert x3.grad.shape == x3.shape and torch.all(x3.grad[1, 2] == 0)


def test_every_target_ignored_gives_nan_like_cross_entropy():
    x, w, t = inputs(N=4, ignored=range(4))
    assert torch.isnan(ops.linear_cross_entropy(x, w, t)) and torch.isnan(unchunked(x, w, t))


def test_only_one_input_needs_a_gradient():
    x, w, t = inputs()
    w = w.detach()
    ops.linear_cross_entropy(x, w, t, chunk_tokens=4).backward()
    x_ref = x.detach().requires_grad_()
    unchunked(x_ref, w, t).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    x, w, t = inputs(N=5, D=3, V=4, ignored=(2,))
    assert torch.autograd.gradcheck(lambda x, w: ops.linear_cross_entropy(x, w, t, chunk_tokens=2), (x, w))


def test_bf16_within_bf16_tolerance():
    x64, w64, t = inputs(N=37, D=16, V=50)
    want = value_and_grads(unchunked, x64, w64, t)
    got = value_and_grads(ops.linear_cross_entropy, x64.bfloat16(), w64.bfloat16(), t, chunk_tokens=8)
    ref = value_and_grads(unchunked, x64.bfloat16(), w64.bfloat16(), t)  # the full logits in bf16
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    for a, r, b in zip(got, ref, want):
        err_ref = (r.double() - b).abs().max().item()
        assert (a.double() - b).abs().max().item() <= 2 * err_ref + 1e-3


def test_autocast_runs_the_matmul_like_f_linear():
    x, w, t = inputs(N=20, D=16, V=30, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = value_and_grads(ops.linear_cross_entropy, x, w, t, chunk_tokens=6)
        want = value_and_grads(unchunked, x, w, t)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)  # the same bf16 logits
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_default_chunk_keeps_float32_logits_at_256_mb():
    assert default_chunk_tokens(32000) == 2097 and default_chunk_tokens(32000) * 32000 * 4 <= 2**28
    assert default_chunk_tokens(2**30) == 1


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_never_holds_the_full_logits():
    N, D, V, chunk = 64, 8, 50, 4  # N * V = 3200 is far above chunk * V, V * D and N * D
    x, w, t = inputs(N=N, D=D, V=V, dtype=torch.float32)
    with LargestTensor() as seen:
        ops.linear_cross_entropy(x, w, t, chunk_tokens=chunk).backward()
    assert seen.numel <= max(chunk * V, V * D, N * D) < N * V
    with LargestTensor() as full:  # the instrument sees the full logits when they exist
        unchunked(x, w, t).backward()
    assert full.numel >= N * V


def test_bad_inputs():
    x, w, t = inputs()
    with pytest.raises(ValueError, match="weight must be"):
        ops.linear_cross_entropy(x, w[:, :4], t)
    with pytest.raises(ValueError, match="x must be a floating-point"):
        ops.linear_cross_entropy(t, w, t)
    with pytest.raises(ValueError, match="targets must be an int64"):
        ops.linear_cross_entropy(x, w, t.int())
    with pytest.raises(ValueError, match="targets must have x's leading dims"):
        ops.linear_cross_entropy(x, w, t[:-1])
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V=13\)"):
        ops.linear_cross_entropy(x, w, torch.full_like(t, 13))
    with pytest.raises(ValueError, match="one dtype"):
        ops.linear_cross_entropy(x.float(), w, t)
    with pytest.raises(ValueError, match="chunk_tokens"):
        ops.linear_cross_entropy(x, w, t, chunk_tokens=0)
    with pytest.raises(ValueError, match="ignore_index"):
        ops.linear_cross_entropy(x, w, t, ignore_index=None)
    for bad in ("avg", None, "MEAN"):
        with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum', 'none', got"):
            ops.linear_cross_entropy(x, w, t, reduction=bad)


def test_shares_the_public_signature():
    public = inspect.signature(ops.linear_cross_entropy)
    assert inspect.signature(ops.linear_cross_entropy_reference) == public
    for fn in dispatch.backends("linear_cross_entropy").values():
        assert inspect.signature(fn) == public


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction, per_chunk", [("mean", 3), ("sum", 3), ("none", 4)])
def test_one_gradient_number_saves_the_recomputed_matmul(reduction, per_chunk):
    """"mean" / "sum": the gradients come with the forward, scaled by the incoming gradient afterwards
    (here 0.37, not 1); "none" recomputes the logits in the backward."""
    x, w, t = inputs(N=12, ignored=(3,))
    weights = torch.full(t.shape, 0.37, dtype=torch.float64) if reduction == "none" else 0.37

    def scaled(fn):
        return lambda x, w, t, **kw: (fn(x, w, t, reduction=reduction, **kw) * weights).sum()

    with CountMatmuls() as count:
        got = value_and_grads(scaled(ops.linear_cross_entropy), x, w, t, chunk_tokens=4)
    assert count.n == 3 * per_chunk
    for a, b in zip(got, value_and_grads(scaled(unchunked), x, w, t)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_return_losses(reduction):
    x, w, t = inputs(ignored=(1, 2))
    loss, losses = ops.linear_cross_entropy(x, w, t, chunk_tokens=5, reduction=reduction, return_losses=True)
    torch.testing.assert_close(losses, unchunked(x, w, t, reduction="none"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, unchunked(x, w, t, reduction=reduction), rtol=1e-12, atol=1e-12)
    assert (losses.grad_fn is None) == (reduction != "none")  # the gradient flows through the loss
    with pytest.raises(ValueError, match="return_losses must be a bool"):
        ops.linear_cross_entropy(x, w, t, return_losses="yes")


def triton_or_skip():
    return pytest.importorskip("triton", reason="the Triton backend needs the `triton` package")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # elsewhere the Triton interpreter


def on_device(*tensors):
    return [t.detach().to(DEVICE) for t in tensors]


def rel_err(a, exact):
    return ((a.double().cpu() - exact).norm() / exact.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("V", [13, 5000])  # one masked block; several blocks of 4096 with a ragged end
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_backend_matches_the_reference(V, reduction):
    """float32: the Triton rows' error against float64 within a small multiple of the torch rows'
    (exact agreement is not expected: the GPU's exp2 is an approximation, and where a token's softmax
    is near 1 its gradient p - 1 cancels)."""
    triton_or_skip()
    x64, w64, t = inputs(N=7, D=8, V=V, ignored=(2,))
    t[0], t[1] = V - 1, 0  # the first and the last column
    with torch.no_grad():
        w64[3] -= 60  # a column far from the rest
    weights64 = torch.rand(t.shape, dtype=torch.float64) if reduction == "none" else 0.5

    def weighted(weights):
        return lambda x, w, t, **kw: (ops.linear_cross_entropy(x, w, t, reduction=reduction, chunk_tokens=3, **kw)
                                      * weights).sum()

    exact = value_and_grads(lambda x, w, t: (unchunked(x, w, t, reduction=reduction) * weights64).sum(), x64, w64, t)
    x, w, t = on_device(x64.float(), w64.float(), t)
    weights = weights64.float().to(DEVICE) if reduction == "none" else 0.5
    with ops.use_kernels("reference"):
        want = value_and_grads(weighted(weights), x, w, t)
    with ops.use_kernels("triton"):
        got = value_and_grads(weighted(weights), x, w, t)
        with torch.no_grad():
            _, losses = ops.linear_cross_entropy(x, w, t, chunk_tokens=3, return_losses=True)
    for a, r, e in zip(got, want, exact):
        assert rel_err(a, e) <= 3 * rel_err(r, e) + 1e-6
    assert rel_err(losses, unchunked(x64, w64, t.cpu(), reduction="none")) <= 1e-6


def test_triton_backend_in_bf16_rounds_like_the_reference():
    """bf16 logits: the same numbers as the torch ops over them, the gradients rounded once to bf16,
    and within twice the error of the full bf16 logits against float64."""
    triton_or_skip()
    x64, w64, t = on_device(*inputs(N=9, D=16, V=50, ignored=(4,)))
    x, w = x64.bfloat16(), w64.bfloat16()
    with ops.use_kernels("reference"):
        want = value_and_grads(ops.linear_cross_entropy, x, w, t, chunk_tokens=4)
    with ops.use_kernels("triton"):
        got = value_and_grads(ops.linear_cross_entropy, x, w, t, chunk_tokens=4)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
    exact, full = value_and_grads(unchunked, x64, w64, t), value_and_grads(unchunked, x, w, t)
    for a, r, b in zip(got, full, exact):
        assert (a.double() - b).abs().max().item() <= 2 * (r.double() - b).abs().max().item() + 1e-3


# ------------------------------------------------------------------ the model
@pytest.mark.parametrize("tie", [True, False])
def test_model_loss_equals_cross_entropy_of_its_logits(tie):
    model = small_model(tie_embeddings=tie).train()
    ids = torch.randint(0, 97, (2, 10))
    labels = torch.randint(0, 97, (2, 10))
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    assert out.logits is None and out.loss.dtype == torch.float64
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    logits = model(ids).logits
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads, torch.autograd.grad(want, list(model.parameters()))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_model_losses_per_position():
    model = small_model()
    ids = torch.randint(0, 97, (2, 10))
    labels = torch.randint(0, 97, (2, 10))
    labels[1, 4:7] = -100
    out = model(ids, labels=labels)
    want = F.cross_entropy(model(ids).logits.transpose(1, 2), labels, reduction="none")
    assert out.losses.shape == (2, 10) and out.losses.dtype == torch.float64
    torch.testing.assert_close(out.losses, want, rtol=1e-12, atol=1e-12)
    assert torch.all(out.losses[1, 4:7] == 0)
    torch.testing.assert_close(out.loss, want.sum() / (labels != -100).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_model_streams_labels_through_a_state(chunk):
    """The state invariant for the loss: chunk by chunk with a state == the full forward, per position."""
    model = small_model()  # float64, every layer kind
    ids = torch.randint(0, 97, (2, 12))
    labels = torch.randint(0, 97, (2, 12))
    labels[0, 2] = -100
    full = model(ids, labels=labels).losses
    state = model.init_state(2)
    parts = []
    for s in range(0, 12, chunk):
        out = model(ids[:, s:s + chunk], state=state, labels=labels[:, s:s + chunk])
        assert out.logits is None and out.state is state
        parts.append(out.losses)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-10)
    assert state.pos.tolist() == [12, 12]


def test_model_label_errors():
    model = small_model()
    ids = torch.randint(0, 97, (2, 6))
    with pytest.raises(ValueError, match="labels cannot be combined with logits_to_keep"):
        model(ids, logits_to_keep=1, labels=ids)
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model(ids, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="labels must be an int64"):
        model(ids, labels=ids.int())
