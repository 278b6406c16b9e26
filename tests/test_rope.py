"""The RoPE reference op against a naive complex-number rotation; chunking, far positions, errors."""

import math

import pytest
import torch

from samba_lm import ops

BASE = 10000.0
f64 = dict(dtype=torch.float64)


def naive_rope(x, positions, base):
    """x [B, T, h, Dh]: the pair (x_i, x_{i+Dh/2}) as one complex number, times e^{i p base^(-2i/Dh)}."""
    half = x.shape[-1] // 2
    freq = torch.tensor([base ** (-2 * i / x.shape[-1]) for i in range(half)], **f64)
    turn = torch.polar(torch.ones_like(freq), positions[..., None, None].double() * freq)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * turn
    return torch.cat([z.real, z.imag], dim=-1)


def split_heads(qkv, H, Hkv):
    return qkv.unflatten(-1, (H + 2 * Hkv, -1)).split([H, Hkv, Hkv], dim=2)


@pytest.mark.parametrize("H, Hkv, Dh, strided", [(4, 2, 8, False), (3, 3, 6, True), (2, 1, 16, True)])
def test_matches_complex_rotation(H, Hkv, Dh, strided):
    T, width = 7, (H + 2 * Hkv) * Dh
    big = torch.randn(2, 2 * T, width + 3, **f64)
    qkv = big[:, ::2, :width] if strided else big[:, :T, :width].contiguous()
    positions = torch.stack([torch.arange(T) + 1000, torch.arange(T) - 3])  # row 1: left padding
    q, k, v = ops.qkv_rope(qkv, positions, H, Hkv, BASE)
    q0, k0, v0 = split_heads(qkv, H, Hkv)
    torch.testing.assert_close(q, naive_rope(q0, positions, BASE))
    torch.testing.assert_close(k, naive_rope(k0, positions, BASE))
    assert torch.equal(v, v0)
    assert q.shape == (2, T, H, Dh) and k.shape == v.shape == (2, T, Hkv, Dh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_give_bit_identical_outputs(dtype):
    T, H, Hkv, Dh = 20, 4, 2, 8
    qkv = torch.randn(2, T, (H + 2 * Hkv) * Dh).to(dtype)
    positions = torch.arange(T).expand(2, T) + torch.tensor([[123456], [-2]])
    whole = ops.qkv_rope(qkv, positions, H, Hkv, BASE)
    cuts = [0, 7, 8, T]
    parts = [ops.qkv_rope(qkv[:, a:b], positions[:, a:b], H, Hkv, BASE) for a, b in zip(cuts, cuts[1:])]
    for full, pieces in zip(whole, zip(*parts)):
        assert torch.equal(full, torch.cat(pieces, dim=1))


def test_position_one_million_is_as_precise_as_ten():
    """fp32 angles would be off by up to 0.06 rad at position 1e6 (their spacing there); float64's are not."""
    H, Hkv, Dh = 2, 1, 64
    qkv = torch.randn(1, 2, (H + 2 * Hkv) * Dh)
    positions = torch.tensor([[10, 1_000_000]])
    q, k, _ = ops.qkv_rope(qkv, positions, H, Hkv, BASE)
    q0, k0, _ = split_heads(qkv, H, Hkv)
    for out, x in ((q, q0), (k, k0)):
        err = (out.double() - naive_rope(x, positions, BASE)).abs().amax(dim=(0, 2, 3))
        assert err.max() < 1e-5, err


def test_gradcheck():
    H, Hkv, Dh, T = 2, 1, 4, 3
    qkv = torch.randn(1, T, (H + 2 * Hkv) * Dh, **f64, requires_grad=True)
    positions = torch.tensor([[-1, 0, 5]])
    assert torch.autograd.gradcheck(lambda x: ops.qkv_rope(x, positions, H, Hkv, BASE), (qkv,))


@pytest.mark.parametrize("change, message", [
    (dict(qkv=torch.randn(3, 64)), r"qkv must have layout \[B, T, \(H \+ 2\*Hkv\) \* Dh\]"),
    (dict(qkv=torch.ones(2, 3, 64, dtype=torch.int32)), "qkv must be a floating-point tensor"),
    (dict(qkv=torch.randn(2, 3, 60)), r"qkv's last dim \(60\) must be \(n_heads \+ 2 \* n_kv_heads\) \* Dh"),
    (dict(qkv=torch.randn(2, 3, 40)), "the head dim Dh = .* = 5 must be even"),
    (dict(positions=torch.zeros(2, 4, dtype=torch.long)), r"positions has shape \(2, 4\), expected \(2, 3\)"),
    (dict(positions=torch.zeros(2, 3)), "positions must be an int64 tensor"),
    (dict(n_heads=3), r"n_kv_heads \(2\) must divide n_heads \(3\)"),
    (dict(n_heads=0), "n_heads must be a positive int"),
    (dict(n_kv_heads=2.0), "n_kv_heads must be a positive int"),
    (dict(base=0.0), "base must be a positive number"),
    (dict(base=math.nan), "base must be a positive number"),
])
def test_argument_errors_name_the_argument(change, message):
    args = dict(qkv=torch.randn(2, 3, 64), positions=torch.zeros(2, 3, dtype=torch.long), n_heads=4,
                n_kv_heads=2, base=BASE)
    args.update(change)
    with pytest.raises(ValueError, match="qkv_rope: " + message):
        ops.qkv_rope(**args)
