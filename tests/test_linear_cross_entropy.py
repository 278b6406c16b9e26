"""ops.linear_cross_entropy: the chunked head + loss against the full logits, and SambaLM(labels=...)."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import small_model
from torch.utils._python_dispatch import TorchDispatchMode

from samba_lm import ops
from samba_lm.ops import dispatch
from samba_lm.ops.linear_cross_entropy import default_chunk_tokens


def unchunked(x, weight, targets, ignore_index=-100):
    """The plain computation the op must equal: the full [N, V] logits, then F.cross_entropy."""
    logits = F.linear(x, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index)


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


def test_shares_the_public_signature():
    public = inspect.signature(ops.linear_cross_entropy)
    assert inspect.signature(ops.linear_cross_entropy_reference) == public
    for fn in dispatch.backends("linear_cross_entropy").values():
        assert inspect.signature(fn) == public


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


def test_model_labels_are_for_training_only():
    model = small_model()
    ids = torch.randint(0, 97, (2, 6))
    with pytest.raises(ValueError, match="state"):
        model(ids, state=model.init_state(2), labels=ids)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=1, labels=ids)
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model(ids, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="labels must be an int64"):
        model(ids, labels=ids.int())
