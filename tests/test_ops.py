"""Each reference op against an independent, naive float64 definition; gradients by gradcheck."""

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F

from samba_lm import ops
from samba_lm.ops import dispatch

f64 = dict(dtype=torch.float64)


# ------------------------------------------------------------------ naive definitions
def naive_scan(u, delta, A, B, C, D, z, bias, h0):
    dt = F.softplus(delta + bias)
    h = h0.clone()
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, 1) + D * u
    return y * F.silu(z), h


def naive_conv(x, w, b, state):
    K = w.shape[1]
    xs = torch.cat([state.transpose(1, 2), x], dim=1)  # [B, K-1+T, E]
    ys = [b + sum(w[:, k] * xs[:, t + k] for k in range(K)) for t in range(x.shape[1])]
    return F.silu(torch.stack(ys, 1)), xs[:, -(K - 1):].transpose(1, 2)


def naive_attention(q, k, v, q_pos, k_pos, window):
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    d = q_pos[:, :, None] - k_pos[:, None, :]
    ok = (k_pos[:, None, :] >= 0) & (d >= 0) & ((d < window) if window else True)
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            if ok[b, i].any():
                p = s[b, :, i, ok[b, i]].softmax(-1)
                out[b, i] = torch.einsum("hk,khd->hd", p, v[b, ok[b, i]])
    return out


def scan_inputs(batch=2, T=37, E=5, N=3, dtype=torch.float64, grad=False):
    t = dict(dtype=dtype)
    args = [torch.randn(batch, T, E, **t), torch.randn(batch, T, E, **t) - 1, -torch.rand(E, N, **t) * 3,
            torch.randn(batch, T, N, **t), torch.randn(batch, T, N, **t), torch.randn(E, **t),
            torch.randn(batch, T, E, **t), torch.randn(E, **t) * 0.1,
            torch.randn(batch, E, N, dtype=torch.float64 if dtype == torch.float64 else torch.float32)]
    return [a.requires_grad_(grad) for a in args]


# ------------------------------------------------------------------ selective scan
@pytest.mark.parametrize("T", [1, 15, 16, 17, 37])
def test_scan_matches_naive(T):
    args = scan_inputs(T=T)
    y, h = ops.selective_scan(*args)
    y0, h0 = naive_scan(*args)
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h0, rtol=1e-12, atol=1e-12)


def test_scan_optional_inputs_default_to_zero_and_none():
    u, delta, A, B, C, D, z, bias, h0 = scan_inputs()
    y, h = ops.selective_scan(u, delta, A, B, C)
    y0, h0_ = naive_scan(u, delta, A, B, C, torch.zeros_like(D), torch.full_like(z, 50.0),
                         torch.zeros_like(bias), torch.zeros_like(h0))
    torch.testing.assert_close(y, y0 / 50, rtol=1e-10, atol=1e-12)  # silu(50) == 50: undo the gate
    torch.testing.assert_close(h, h0_)


def test_scan_chunked_equals_whole():
    u, delta, A, B, C, D, z, bias, h0 = scan_inputs(T=41)
    y, h = ops.selective_scan(u, delta, A, B, C, D, z, bias, h0)
    ys, state = [], h0
    for a, b in [(0, 1), (1, 18), (18, 40), (40, 41)]:
        yc, state = ops.selective_scan(u[:, a:b], delta[:, a:b], A, B[:, a:b], C[:, a:b], D, z[:, a:b], bias, state)
        ys.append(yc)
    torch.testing.assert_close(torch.cat(ys, 1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, h, rtol=1e-12, atol=1e-12)


def test_scan_gradcheck():
    args = scan_inputs(batch=1, T=19, E=2, N=2, grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.selective_scan(*a), args)


def test_scan_low_precision_keeps_fp32_state_and_stays_close():
    args64 = scan_inputs(T=40, E=8)
    y64, h64 = ops.selective_scan(*args64)
    args16 = [a.to(torch.bfloat16) if i < 8 else a.float() for i, a in enumerate(args64)]
    y16, h16 = ops.selective_scan(*args16)
    assert y16.dtype == torch.bfloat16 and h16.dtype == torch.float32
    assert (y16.double() - y64).abs().max() < 0.05 * y64.abs().max()


# ------------------------------------------------------------------ causal conv
@pytest.mark.parametrize("K", [2, 4])
def test_conv_matches_naive_and_chunks(K):
    x, w, b, s = torch.randn(2, 23, 6, **f64), torch.randn(6, K, **f64), torch.randn(6, **f64), torch.randn(2, 6, K - 1, **f64)
    y, state = ops.causal_conv1d(x, w, b, s)
    y0, s0 = naive_conv(x, w, b, s)
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(state, s0)
    ys, st = [], s
    for a, c in [(0, 1), (1, 2), (2, 11), (11, 23)]:
        yc, st = ops.causal_conv1d(x[:, a:c], w, b, st)
        ys.append(yc)
    torch.testing.assert_close(torch.cat(ys, 1), y)
    torch.testing.assert_close(st, state)


def test_conv_no_state_is_zero_history_and_gradcheck():
    x, w, b = (torch.randn(2, 9, 3, **f64, requires_grad=True), torch.randn(3, 4, **f64, requires_grad=True),
               torch.randn(3, **f64, requires_grad=True))
    s = torch.randn(2, 3, 3, **f64, requires_grad=True)
    y, _ = ops.causal_conv1d(x, w, b)
    torch.testing.assert_close(y, naive_conv(x, w, b, torch.zeros(2, 3, 3, **f64))[0])
    assert torch.autograd.gradcheck(lambda *a: ops.causal_conv1d(*a), (x, w, b, s))


# ------------------------------------------------------------------ attention
def attn_inputs(batch=2, Tq=11, Tk=11, H=4, Hkv=2, Dh=8, grad=False):
    q = torch.randn(batch, Tq, H, Dh, **f64, requires_grad=grad)
    k = torch.randn(batch, Tk, Hkv, Dh, **f64, requires_grad=grad)
    v = torch.randn(batch, Tk, Hkv, Dh, **f64, requires_grad=grad)
    return q, k, v


@pytest.mark.parametrize("window", [0, 1, 4, 200])
def test_attention_matches_naive_causal(window, monkeypatch):
    monkeypatch.setattr(importlib.import_module("samba_lm.ops.attention"), "QUERY_BLOCK", 4)
    q, k, v = attn_inputs(Tq=13, Tk=13)
    pos = torch.arange(13).expand(2, 13)
    out = ops.attention(q, k, v, pos, window)
    torch.testing.assert_close(out, naive_attention(q, k, v, pos, pos, window))


def test_differential_queries_score_each_half_of_the_keys():
    """Queries half as wide as the keys: head h (of an even count) against half h mod 2 of its key head,
    scale 1/sqrt(Dh/2), the whole value; through a prefix too, and with gradients."""
    q = torch.randn(2, 5, 8, 4, **f64, requires_grad=True)
    k, v = attn_inputs(Tq=5, Tk=5, Hkv=2, Dh=8)[1:]
    kp, vp = attn_inputs(Tq=1, Tk=3, Hkv=2, Dh=8)[1:]
    prefix_pos, q_pos = torch.tensor([[0, 1, -1]] * 2), torch.arange(2, 7).expand(2, 5)
    out = ops.attention(q, k, v, q_pos, 4, kp, vp, prefix_pos)
    assert out.shape == (2, 5, 8, 8)
    keys, values, k_pos = torch.cat([kp, k], 1), torch.cat([vp, v], 1), torch.cat([prefix_pos, q_pos], 1)
    for b in range(2):
        for i in range(5):
            seen = (k_pos[b] >= 0) & (q_pos[b, i] - k_pos[b] >= 0) & (q_pos[b, i] - k_pos[b] < 4)
            for h in range(8):  # G = 4: key head h // 4, its half h % 2
                half = keys[b, seen, h // 4, 4 * (h % 2):4 * (h % 2) + 4]
                p = (half @ q[b, i, h] / 2.0).softmax(0)  # 1/sqrt(Dh/2) = 1/2
                torch.testing.assert_close(out[b, i, h], p @ values[b, seen, h // 4])
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_attention_exact_window_edge():
    """Query i sees i-W+1 .. i: with one-hot values, the output weights reveal exactly which keys."""
    W, T = 4, 10
    q = k = torch.zeros(1, T, 1, T, **f64)  # equal scores: uniform weights over the visible keys
    v = torch.eye(T, **f64)[None, :, None, :]  # key j carries the one-hot vector e_j
    pos = torch.arange(T)[None]
    out = ops.attention(q, k, v, pos, W)[0, :, 0]
    for i in range(T):
        seen = (out[i] > 0).nonzero().flatten().tolist()
        assert seen == list(range(max(0, i - W + 1), i + 1))


def test_attention_prefix_in_ring_order_with_empty_slots():
    """A prefix in ring order with an empty slot (pos -1) gives the same result in any order."""
    q, k, v = attn_inputs(Tq=3, Tk=3)
    kp, vp = attn_inputs(Tq=1, Tk=6)[1:]
    prefix_pos = torch.tensor([[5, 6, -1, 2, 3, 4]] * 2)
    q_pos = torch.tensor([[7, 8, 9]] * 2)
    out = ops.attention(q, k, v, q_pos, 5, kp, vp, prefix_pos)
    expected = naive_attention(q, torch.cat([kp, k], 1), torch.cat([vp, v], 1), q_pos, torch.cat([prefix_pos, q_pos], 1), 5)
    torch.testing.assert_close(out, expected)
    perm = torch.randperm(6)
    torch.testing.assert_close(ops.attention(q, k, v, q_pos, 5, kp[:, perm], vp[:, perm], prefix_pos[:, perm]), out)


def test_attention_fully_masked_rows_are_zero_without_nan():
    q, k, v = attn_inputs(Tq=3, Tk=3, grad=True)
    kp, vp = attn_inputs(Tq=1, Tk=1, grad=True)[1:]
    q_pos = torch.tensor([[-2, -1, 0]] * 2)  # left padding: the padded queries see nothing
    out = ops.attention(q, k, v, q_pos, 8, kp, vp, torch.tensor([[-3]] * 2))
    assert torch.all(out[:, :2] == 0)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, kp, vp))


def test_attention_gradcheck():
    q, k, v = attn_inputs(batch=1, Tq=5, Tk=5, H=2, Hkv=1, Dh=4, grad=True)
    kp, vp = attn_inputs(batch=1, Tq=1, Tk=2, H=2, Hkv=1, Dh=4, grad=True)[1:]
    q_pos, prefix_pos = torch.arange(2, 7)[None], torch.tensor([[1, 0]])
    assert torch.autograd.gradcheck(lambda q, k, v, kp, vp: ops.attention(q, k, v, q_pos, 3, kp, vp, prefix_pos),
                                    (q, k, v, kp, vp))


# ------------------------------------------------------------------ interfaces
@pytest.mark.parametrize("name", ["selective_scan", "causal_conv1d", "attention", "attention_with_cache", "qkv_rope",
                                  "add_rmsnorm", "swiglu", "mamba_inner", "choose_tokens", "linear"])
def test_every_backend_shares_the_public_signature(name):
    public = inspect.signature(getattr(ops, name))
    assert inspect.signature(getattr(ops, name + "_reference")) == public
    for backend, fn in dispatch.backends(name).items():
        assert inspect.signature(fn) == public, backend


def test_dispatch_env_and_context(monkeypatch):
    x = torch.randn(1, 3, 2)
    monkeypatch.setenv("SAMBA_LM_KERNELS", "bogus")
    with pytest.raises(ValueError, match="SAMBA_LM_KERNELS"):
        ops.causal_conv1d(x, torch.randn(2, 4))
    monkeypatch.setenv("SAMBA_LM_KERNELS", "reference")
    ops.causal_conv1d(x, torch.randn(2, 4))
    with ops.use_kernels("reference"):
        assert dispatch.resolve("causal_conv1d", x.device, x.dtype) is ops.causal_conv1d_reference
    with pytest.raises(ValueError, match="backend"):
        with ops.use_kernels("cuda-magic"):
            pass


@pytest.mark.parametrize("call, match", [
    (lambda: ops.selective_scan(torch.randn(2, 5), torch.randn(2, 5), torch.randn(5, 3),
                                torch.randn(2, 5, 3), torch.randn(2, 5, 3)), "u must have layout"),
    (lambda: ops.selective_scan(torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.randn(4, 3),
                                torch.randn(2, 5, 2), torch.randn(2, 5, 3)), "B has shape"),
    (lambda: ops.selective_scan(torch.randn(2, 5, 4), torch.randn(2, 5, 4).long(), torch.randn(4, 3),
                                torch.randn(2, 5, 3), torch.randn(2, 5, 3)), "delta must be a floating"),
    (lambda: ops.causal_conv1d(torch.randn(2, 5, 4), torch.randn(3, 4)), "weight has shape"),
    (lambda: ops.attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4),
                           torch.zeros(1, 2).long()), "must divide"),
    (lambda: ops.attention(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4),
                           torch.zeros(1, 2)), "q_pos must be an int64"),
    (lambda: ops.attention(torch.randn(1, 2, 2, 3), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4),
                           torch.zeros(1, 2).long()), "or half of it"),
    (lambda: ops.attention(torch.randn(1, 2, 3, 2), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4),
                           torch.zeros(1, 2).long()), "even number of query heads"),
    (lambda: ops.attention(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4),
                           torch.zeros(1, 2).long(), -1), "window"),
    (lambda: ops.attention(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4),
                           torch.zeros(1, 2).long(), 4, torch.randn(1, 3, 2, 4)), "all three or none"),
    (lambda: ops.attention(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4),
                           torch.zeros(1, 2).long(), 4, torch.randn(1, 3, 2, 4), torch.randn(1, 3, 1, 4),
                           torch.zeros(1, 3).long()), "v_prefix has shape"),
])
def test_op_argument_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
