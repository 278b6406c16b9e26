"""Differential attention (SambaY's, `dswa` / `dattn`) against the equations, written here from
../shared/SAMBAY.md with four softmax attentions per layer, not from the layer's code; and the
model's invariants with it: full == chunked == token by token, and each row alone."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_stream_invariants, small_model

SAMBAY_LIKE = dict(layers=("mamba", "mlp", "dswa", "mlp", "dattn", "mlp"), norm="layer", attention_bias=True,
                   rope=False)


def softmax_attention(q, k, v, window):
    """q [B, T, h, d], k and v [B, T, hkv, dv]: causal (and windowed) softmax, GQA by repeating k, v."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    T = q.shape[1]
    dist = torch.arange(T)[:, None] - torch.arange(T)[None]
    visible = (dist >= 0) & ((dist < window) if window else True)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def project_heads(layer, x):
    """q, k, v [B, T, heads, Dh] of a self-attention layer: Wqkv (with bias), [q | k | v] along the output."""
    H, Hkv, Dh = layer.n_heads, layer.n_kv_heads, layer.head_dim
    qkv = x @ layer.qkv_proj.weight.T + layer.qkv_proj.bias
    return (t.unflatten(-1, (-1, Dh)) for t in qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], -1))


def differential(layer, q, k, v, window):
    """SAMBAY.md's differential attention of heads q, k, v, with the layer's lambdas, subln and out_proj."""
    q1, q2, k1, k2, v1, v2 = q[:, :, 0::2], q[:, :, 1::2], k[:, :, 0::2], k[:, :, 1::2], v[:, :, 0::2], v[:, :, 1::2]
    a1 = torch.cat([softmax_attention(q1, k1, v1, window), softmax_attention(q1, k1, v2, window)], -1)
    a2 = torch.cat([softmax_attention(q2, k2, v1, window), softmax_attention(q2, k2, v2, window)], -1)
    lam = (torch.exp((layer.lambda_q1 * layer.lambda_k1).sum()) - torch.exp((layer.lambda_q2 * layer.lambda_k2).sum())
           + layer.lambda_init)
    d = a1 - lam * a2
    sub = d / torch.sqrt(d.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.subln_weight
    out = (sub * (1 - layer.lambda_init)).reshape(*q.shape[:2], layer.n_heads * layer.head_dim)
    return out @ layer.out_proj.weight.T + layer.out_proj.bias


def differential_attention(layer, x):
    return differential(layer, *project_heads(layer, x), layer.window)


def random_model(**overrides):
    model = small_model(torch.float64, **{**SAMBAY_LIKE, **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("proj.bias", "norm.bias", "norm_f.bias", "lambda_q1", "lambda_k1", "lambda_q2",
                              "lambda_k2", "subln_weight")):
                p.uniform_(-0.5, 0.5) if "subln" not in name else p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("index", [2, 4])  # dswa (window 8), dattn
def test_the_layer_is_the_equations(index):
    model = random_model()
    layer = model.layers[index].mixer
    assert layer.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * (index // 2)))  # its block's index
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    positions = torch.arange(19).expand(2, 19)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, positions), differential_attention(layer, x), rtol=1e-10, atol=1e-10)


def test_the_cross_layer_reads_the_global_layers_keys_and_values():
    """dcross: queries from its own projection, keys and values of the dattn below, full and causal."""
    model = random_model(layers=("dattn", "mlp", "dcross", "mlp"))
    glob, cross = model.layers[0].mixer, model.layers[2].mixer
    assert glob.share_kv and cross.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3))
    x_g, x_c = torch.randn(2, 13, 32, dtype=torch.float64), torch.randn(2, 13, 32, dtype=torch.float64)
    positions = torch.arange(13).expand(2, 13)
    with torch.no_grad():
        out, kv = glob(x_g, positions)
        torch.testing.assert_close(out, differential_attention(glob, x_g), rtol=1e-10, atol=1e-10)
        _, k, v = project_heads(glob, x_g)
        q = (x_c @ cross.q_proj.weight.T + cross.q_proj.bias).unflatten(-1, (-1, cross.head_dim))
        torch.testing.assert_close(cross(x_c, positions, kv=kv), differential(cross, q, k, v, 0), rtol=1e-10,
                                   atol=1e-10)


def test_cross_layers_keep_no_state_and_share_the_growing_cache():
    """The global layer's cache is the only one: the cross layers hold nothing of their own."""
    model = random_model(layers=("mamba_mem", "mlp", "dattn", "mlp", "gmu", "mlp", "dcross", "mlp", "dcross", "mlp"))
    state = model.init_state(2)
    assert [r is None for r in state.layers] == [False, True, False, True, True, True, True, True, True, True]
    assert_stream_invariants(model, torch.randint(0, 97, (2, 15)), ([0, 4, 9, 15], range(16)))
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 15)), state=state)
    assert state.layers[2].length == 15  # the shared cache counts each token once


def test_cross_layers_need_a_global_layer_below_and_no_rope():
    with pytest.raises(ValueError, match="a 'dcross' \\(sub-layer 0\\) reads the keys and values of a 'dattn'"):
        small_model(torch.float64, layers=("dcross", "mlp", "dattn"), rope=False)
    with pytest.raises(ValueError, match="SambaConfig.rope=True: must be False with 'dcross' layers"):
        small_model(torch.float64, layers=("dattn", "mlp", "dcross", "mlp"))


@pytest.mark.parametrize("rope", [False, True])
def test_full_equals_chunked_equals_stepwise_and_each_row_alone(rope):
    assert_stream_invariants(random_model(rope=rope), torch.randint(0, 97, (2, 21)), ([0, 3, 12, 21], range(22)))


def test_gradients_reach_every_parameter():
    model = random_model()
    model.train()
    loss = model(torch.randint(0, 97, (2, 11))).logits.square().mean()
    loss.backward()
    for name in ("lambda_q1", "lambda_k2", "subln_weight", "qkv_proj.bias"):
        grads = [p.grad for n, p in model.named_parameters() if n.endswith(name)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_odd_kv_heads_are_refused():
    with pytest.raises(ValueError, match="SambaConfig.n_kv_heads=1: must be even for differential attention"):
        small_model(torch.float64, layers=("dswa", "mlp"), n_kv_heads=1)


def test_yoco_runs_the_cross_half_for_the_kept_positions_only():
    """With logits_to_keep, the sub-layers above the last stateful one (the global layer) see only
    the kept positions, and the logits and the state are those of the whole forward."""
    model = random_model(layers=("mamba", "mlp", "mamba_mem", "mlp", "dattn", "mlp", "gmu", "mlp", "dcross", "mlp"))
    assert model.position_wise_from == 5
    seen = {}
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda module, args, out, i=i: seen.__setitem__(i, args[0].shape[1]))
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        state = model.init_state(2)
        kept = model(ids[:, :9], state=state, logits_to_keep=2).logits
        assert [seen[i] for i in range(10)] == [9] * 5 + [2] * 5
        rest = torch.cat([model(ids[:, t:t + 1], state=state).logits for t in range(9, 12)], 1)
    torch.testing.assert_close(kept, full[:, 7:9], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rest, full[:, 9:], rtol=1e-9, atol=1e-9)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def naive_mix(out, lq1, lk1, lq2, lk2, lambda_init, weight, eps):
    """SAMBAY.md's mix of the two halves, in float64: lambda, the difference, RMSNorm, the scale."""
    out, lq1, lk1, lq2, lk2, weight = (t.double() for t in (out, lq1, lk1, lq2, lk2, weight))
    lam = torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + lambda_init
    a1, a2 = out[:, :, 0::2], out[:, :, 1::2]  # the heads interleaved, as the model's
    diff = a1 - lam * a2
    return diff / torch.sqrt((diff * diff).mean(-1, keepdim=True) + eps) * weight * (1 - lambda_init)


def mix_inputs(dtype, strided, H=6, Dh=16):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 5, H + 2 if strided else H, 2 * Dh, generator=g)
    out = (out[:, :, 1:H + 1] if strided else out).to(DEVICE, dtype)  # strided: heads of a wider tensor
    lambdas = [(torch.randn(Dh, generator=g) * 0.1).to(DEVICE, dtype) for _ in range(4)]
    weight = (1 + 0.1 * torch.randn(2 * Dh, generator=g)).to(DEVICE, dtype)
    return out, lambdas, weight


def test_the_mix_reference_is_the_equations():
    from samba_lm import ops

    out, lambdas, weight = mix_inputs(torch.float64, strided=False)
    got = ops.differential_mix_reference(out, *lambdas, 0.35, weight, 1e-5)
    torch.testing.assert_close(got.cpu(), naive_mix(out, *lambdas, 0.35, weight, 1e-5).cpu(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_the_mix_kernel_against_float64(dtype, strided):
    """The Triton kernel (no gradients) against float64: no further from it than the reference run in
    the kernel's dtype, times a small factor (flash-attention's rule; 3, as tests/test_fused_ops.py, since
    Triton's CPU interpreter truncates where a GPU rounds)."""
    pytest.importorskip("triton", reason="Triton kernels need the `triton` package (pip install triton)")
    from samba_lm import ops

    out, lambdas, weight = mix_inputs(dtype, strided)
    exact = naive_mix(out, *lambdas, 0.35, weight, 1e-5).cpu()
    with torch.no_grad(), ops.use_kernels("triton"):
        got = ops.differential_mix(out, *lambdas, 0.35, weight, 1e-5)
    ref = ops.differential_mix_reference(out, *lambdas, 0.35, weight, 1e-5)
    assert got.dtype == dtype and got.shape == (2, 5, 3, 32) and got.is_contiguous()
    err = lambda t: ((t.cpu().double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(got) <= 3 * err(ref) + 1e-6, (err(got), err(ref))


def test_the_mix_kernel_runs_without_gradients_and_the_composition_with_them():
    pytest.importorskip("triton", reason="Triton kernels need the `triton` package (pip install triton)")
    from samba_lm import ops

    out, lambdas, weight = mix_inputs(torch.float32, strided=False)
    leaves = [t.clone().requires_grad_(True) for t in (out, *lambdas, weight)]
    with ops.use_kernels("triton"):
        y = ops.differential_mix(*leaves[:5], 0.35, leaves[5], 1e-5)
    (y * torch.arange(y.numel(), device=DEVICE).reshape(y.shape)).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)
    with torch.no_grad(), ops.use_kernels("triton"):
        fast = ops.differential_mix(*leaves[:5], 0.35, leaves[5], 1e-5)
    torch.testing.assert_close(fast, y.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, match", [
    (dict(out=torch.zeros(2, 5, 3, 32)), "even H"),
    (dict(out=torch.zeros(2, 5, 32)), "out must have layout"),
    (dict(weight=torch.ones(16)), "weight"),
    (dict(lambda_q2=torch.ones(8)), "lambda_q2"),
    (dict(eps=0.0), "eps must be positive"),
    (dict(lambda_init=float("nan")), "lambda_init"),
])
def test_mix_errors_name_the_argument(change, match):
    from samba_lm import ops

    args = dict(out=torch.zeros(2, 5, 4, 32), lambda_q1=torch.ones(16), lambda_k1=torch.ones(16),
                lambda_q2=torch.ones(16), lambda_k2=torch.ones(16), lambda_init=0.2, weight=torch.ones(32), eps=1e-5)
    with pytest.raises(ValueError, match=match):
        ops.differential_mix(**{**args, **change})
