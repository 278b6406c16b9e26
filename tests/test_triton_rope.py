"""The Triton QKV RoPE against the float64 reference (on CPUs through TRITON_INTERPRET=1, on GPUs natively).

Tolerances follow flash-attention's rule: the kernel's error against float64 may be a small multiple
of the error of the reference computed in the kernel's own dtype.
"""

import pytest
import torch

from samba_lm import ops

triton = pytest.importorskip("triton", reason="Triton kernels need the `triton` package (pip install triton)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BASE = 10000.0
H, HKV = 4, 2  # GQA


def rel_err(a, ref):
    return ((a.cpu().double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run(qkv_base, view, positions, grads):
    """(q, k, v, d qkv_base) in float64, with qkv a view of a leaf so that its gradient is a full tensor."""
    leaf = qkv_base.detach().clone().requires_grad_(True)
    outs = ops.qkv_rope(view(leaf), positions, H, HKV, BASE)
    sum((o.double() * g).sum() for o, g in zip(outs, grads)).backward()
    return [o.double().cpu() for o in outs] + [leaf.grad.double().cpu()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, Dh, strided", [(19, 64, False), (1, 64, True), (19, 128, True), (5, 96, False)])
@pytest.mark.parametrize("heads", [3, 8])  # 8 heads in 3 programs, the last one short; all in one
def test_values_and_gradients(dtype, T, Dh, strided, heads):
    batch, width = 2, (H + 2 * HKV) * Dh
    g = torch.Generator().manual_seed(T + Dh)
    # Strided: every other time step of a wider buffer, as a view (batch and time strides only).
    base = torch.randn(batch, 2 * T if strided else T, width + (8 if strided else 0), generator=g, dtype=torch.float64)
    view = (lambda x: x[:, ::2, :width]) if strided else (lambda x: x)
    positions = torch.stack([torch.arange(T) + 100_000, torch.arange(T) - 3]).to(DEVICE)  # row 1: left padding
    grads = [torch.randn(batch, T, h, Dh, generator=g, dtype=torch.float64).to(DEVICE) for h in (H, HKV, HKV)]

    exact = run(base, view, positions.cpu(), [gr.cpu() for gr in grads])
    low = base.to(DEVICE, dtype)
    with ops.use_kernels("reference"):
        ref = run(low, view, positions, grads)
    with ops.use_kernels("triton"), ops.tuned(rope=dict(heads_per_program=heads)):
        tri = run(low, view, positions, grads)
    slack = 1e-6 if dtype == torch.float32 else 1e-3
    for name, t, r, e in zip(["q", "k", "v", "dqkv"], tri, ref, exact):
        assert rel_err(t, e) <= 3 * rel_err(r, e) + slack, name


def test_outputs_are_contiguous_in_the_input_dtype():
    qkv = torch.randn(2, 3, (H + 2 * HKV) * 64, device=DEVICE, dtype=torch.bfloat16)
    with ops.use_kernels("triton"):
        outs = ops.qkv_rope(qkv, torch.arange(3, device=DEVICE).expand(2, 3), H, HKV, BASE)
    assert all(o.is_contiguous() and o.dtype == torch.bfloat16 for o in outs)


def test_custom_op_registration():
    """Schema, fake (meta) shapes and autograd registration, as torch.compile relies on them."""
    from samba_lm.ops.rope import rope_inv_freq

    qkv = torch.randn(2, 3, (H + 2 * HKV) * 8, device=DEVICE, requires_grad=True)
    positions = torch.arange(3, device=DEVICE).expand(2, 3).contiguous()
    torch.library.opcheck(torch.ops.samba_lm.qkv_rope_fwd.default,
                          (qkv, positions, rope_inv_freq(8, BASE, qkv.device), H, HKV))
