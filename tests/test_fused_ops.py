"""The fused residual add + RMSNorm (and + LayerNorm) and SwiGLU ops: the references against naive float64 formulas, the
Triton kernels against float64 (on CPUs through TRITON_INTERPRET=1, on GPUs natively).

Kernel tolerances follow flash-attention's rule: the kernel's error against float64 may be a small
multiple of the error of the reference computed in the kernel's own dtypes.
"""

import importlib.util

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from samba_lm import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f64 = dict(dtype=torch.float64)
EPS = 1e-5
bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton kernels need the `triton` package (pip install triton)")


def naive_add_rmsnorm(h, delta, weight, eps):
    s = h if delta is None else h + delta
    return s, s / torch.sqrt((s * s).mean(-1, keepdim=True) + eps) * weight


def naive_add_layernorm(h, delta, weight, bias, eps):
    s = h if delta is None else h + delta
    centred = s - s.mean(-1, keepdim=True)
    return s, centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + eps) * weight + bias


def naive_swiglu(x):
    H = x.shape[-1] // 2
    gate, up = x[..., :H], x[..., H:]
    return gate / (1 + torch.exp(-gate)) * up


def rel_err(a, ref):
    return ((a.cpu().double() - ref.cpu()).norm() / ref.cpu().norm().clamp_min(1e-30)).item()


def leaf(t):
    """A leaf copy of t with t's strides: a strided view stays one for the kernel (clone() would not)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t).requires_grad_(True)


def run(fn, inputs, grads):
    """Outputs and input gradients (float64), for loss = sum(output * grad) over the outputs."""
    leaves = [leaf(t) if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum((o.double() * g.to(o.device)).sum() for o, g in zip(outs, grads)).backward()
    return [o.detach().double() for o in outs] + [t.grad.double() for t in leaves if t is not None]


def assert_kernel_close(fn, low, grads):
    """`fn` through the Triton backend against float64, its error bounded by the reference's in `low`'s dtypes."""
    exact = run(fn, [t.double().cpu() if t is not None else None for t in low], [g.cpu() for g in grads])
    with ops.use_kernels("reference"):
        ref = run(fn, low, grads)
    with ops.use_kernels("triton"):
        tri = run(fn, low, grads)
    slack = 1e-6 if all(t is None or t.dtype == fp32 for t in low) else 1e-3
    for i, (t, r, e) in enumerate(zip(tri, ref, exact)):
        assert rel_err(t, e) <= 3 * rel_err(r, e) + slack, i


# ------------------------------------------------------------------ references
@pytest.mark.parametrize("shape", [(7, 48), (2, 5, 80)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rmsnorm_reference_matches_naive_and_gradcheck(shape, with_delta):
    h, delta, w = torch.randn(shape, **f64), torch.randn(shape, **f64), torch.rand(shape[-1], **f64) + 0.5
    delta = delta if with_delta else None
    for got, want in zip(ops.add_rmsnorm(h, delta, w, EPS), naive_add_rmsnorm(h, delta, w, EPS)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    small = [t[..., :6].clone().requires_grad_(True) for t in (h, delta, w) if t is not None]
    fn = ((lambda h, d, w: ops.add_rmsnorm(h, d, w, EPS)) if with_delta
          else (lambda h, w: ops.add_rmsnorm(h, None, w, EPS)))
    assert torch.autograd.gradcheck(fn, small)


def test_add_rmsnorm_reference_dtypes_and_the_unfused_rmsnorm():
    """s keeps h's dtype (delta upcast); y is bit for bit the RMSNorm layer's formula before the fusion,
    in the weight's dtype."""
    weight = (torch.rand(48) + 0.5).to(bf16)
    h, delta = torch.randn(2, 3, 48), torch.randn(2, 3, 48, dtype=bf16)
    s, y = ops.add_rmsnorm(h, delta, weight, EPS)
    xf = h + delta.float()
    unfused = ((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)) * weight.float()).to(bf16)
    assert s.dtype == fp32 and y.dtype == bf16
    assert torch.equal(s, xf) and torch.equal(y, unfused)
    assert ops.add_rmsnorm(h, None, weight, EPS)[0] is h


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_norm_out_dtype_gives_the_cast_of_y_and_the_same_gradients(backend, norm):
    """y in out_dtype (autocast's, as the model asks for it) is bit for bit the weight-dtype y cast to
    it, the cast that the next matmul would make; and the gradients are those through that cast."""
    g = torch.Generator().manual_seed(3)
    h, delta = torch.randn(2, 5, 80, generator=g).to(DEVICE), torch.randn(2, 5, 80, generator=g).to(DEVICE, bf16)
    weight, bias = (torch.rand(80, generator=g) + 0.5).to(DEVICE), (torch.randn(80, generator=g) * 0.1).to(DEVICE)
    gy = torch.randn(2, 5, 80, generator=g).to(DEVICE, bf16)
    extra = (bias,) if norm == "layer" else ()
    fn = ops.add_layernorm if norm == "layer" else ops.add_rmsnorm

    def run(out_dtype):
        leaves = [t.clone().requires_grad_(True) for t in (h, delta, weight, *extra)]
        s, y = fn(*leaves[:3], *leaves[3:], EPS, out_dtype)
        (s.sum() + (y.to(bf16).float() * gy.float()).sum()).backward()  # to(bf16): a no-op for bf16
        return [y.detach()] + [t.grad for t in leaves]

    with ops.use_kernels(backend):
        cast, direct = run(None), run(bf16)
    assert cast[0].dtype == fp32 and direct[0].dtype == bf16
    y32 = cast[0]
    if backend == "triton" and ops.interpreting() and norm == "rms":
        # Triton's CPU interpreter truncates fp32 -> bf16 where a GPU rounds (as torch's cast does).
        y32 = (y32.view(torch.int32) & -65536).view(fp32)
    assert torch.equal(direct[0], y32.to(bf16))
    for a, b in zip(cast[1:], direct[1:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(7, 48), (2, 5, 80)])
def test_swiglu_reference_matches_naive_and_gradcheck(shape):
    x = torch.randn(shape, **f64)
    torch.testing.assert_close(ops.swiglu(x), naive_swiglu(x), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(ops.swiglu, x[..., :12].clone().requires_grad_(True))
    y = ops.swiglu(x.to(bf16))
    assert y.dtype == bf16 and y.shape == (*shape[:-1], shape[-1] // 2)


# ------------------------------------------------------------------ Triton against float64
def low_inputs(shape, dtypes, with_delta, strided, seed):
    g = torch.Generator().manual_seed(seed)
    D = shape[-1]
    # Strided: every other time step of a wider buffer, as a view (batch and time strides only).
    wide = (shape[0], 2 * shape[1], D + 8) if strided else shape
    view = (lambda t: t[:, ::2, :D]) if strided else (lambda t: t)
    h = view(torch.randn(wide, generator=g, **f64).to(DEVICE, dtypes[0]))
    delta = view(torch.randn(wide, generator=g, **f64).to(DEVICE, dtypes[1])) if with_delta else None
    weight = (torch.rand(D, generator=g, **f64) + 0.5).to(DEVICE, dtypes[2])
    grads = [torch.randn(shape, generator=g, **f64).to(DEVICE) for _ in range(2)]
    return h, delta, weight, grads


@needs_triton
@pytest.mark.parametrize("dtypes", [(fp32, fp32, fp32), (fp32, bf16, fp32), (fp32, bf16, bf16), (fp32, fp16, fp16),
                                    (bf16, bf16, bf16)], ids=["fp32", "autocast", "bf16", "fp16", "bf16-stream"])
@pytest.mark.parametrize("shape, with_delta, strided", [((2, 5, 48), True, False), ((7, 80), True, False),
                                                        ((2, 3, 80), True, True), ((3, 1, 48), False, False)])
def test_add_rmsnorm_triton_values_and_gradients(dtypes, shape, with_delta, strided):
    h, delta, weight, grads = low_inputs(shape, dtypes, with_delta, strided, seed=shape[-1])
    assert_kernel_close(lambda h, d, w: ops.add_rmsnorm(h, d, w, EPS), [h, delta, weight], grads)


@pytest.mark.parametrize("with_delta", [True, False])
def test_add_layernorm_reference_matches_naive_and_gradcheck(with_delta):
    g = torch.Generator().manual_seed(3)
    h, delta = (torch.randn(2, 5, 24, generator=g, **f64) for _ in range(2))
    weight, bias = torch.rand(24, generator=g, **f64) + 0.5, torch.randn(24, generator=g, **f64)
    delta = delta if with_delta else None
    expected = naive_add_layernorm(h, delta, weight, bias, EPS)
    for got, want in zip(ops.add_layernorm(h, delta, weight, bias, EPS), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    leaves = [t[..., :6].clone().requires_grad_(True) for t in (h, weight, bias)]
    assert torch.autograd.gradcheck(lambda h, w, b: ops.add_layernorm(h, None, w, b, EPS), leaves)


@needs_triton
@pytest.mark.parametrize("dtypes", [(fp32, fp32, fp32), (fp32, bf16, bf16), (bf16, bf16, bf16)],
                         ids=["fp32", "bf16", "bf16-stream"])
@pytest.mark.parametrize("shape, with_delta, strided", [((2, 5, 48), True, False), ((2, 3, 80), True, True),
                                                        ((3, 1, 48), False, False)])
def test_add_layernorm_triton_against_float64(dtypes, shape, with_delta, strided):
    """The kernel (no gradients) against float64; with gradients the reference's composition runs."""
    h, delta, weight, _ = low_inputs(shape, dtypes, with_delta, strided, seed=shape[-1])
    bias = torch.randn(shape[-1], generator=torch.Generator().manual_seed(1), **f64).to(DEVICE, dtypes[2])
    exact = naive_add_layernorm(*(t.double().cpu() if t is not None else None for t in (h, delta, weight, bias)), EPS)
    ref = ops.add_layernorm_reference(h, delta, weight, bias, EPS)
    with torch.no_grad(), ops.use_kernels("triton"):
        got = ops.add_layernorm(h, delta, weight, bias, EPS)
    slack = 1e-6 if dtypes == (fp32, fp32, fp32) else 1e-3
    for t, r, e in zip(got, ref, exact):
        assert t.dtype == r.dtype and t.shape == r.shape and t.is_contiguous()
        assert rel_err(t, e) <= 3 * rel_err(r, e) + slack
    leaves = [t.clone().requires_grad_(True) for t in (h, weight, bias)]
    with ops.use_kernels("triton"):
        s, y = ops.add_layernorm(leaves[0], delta, *leaves[1:], EPS)
    y.float().sum().backward()
    assert all(t.grad is not None for t in leaves)
    torch.testing.assert_close(y.detach(), ref[1])


@needs_triton
@pytest.mark.parametrize("dtype, shape, strided", [
    *[(dtype, shape, strided) for dtype in (fp32, bf16, fp16)
      for shape, strided in [((2, 5, 48), False), ((7, 80), False), ((2, 3, 80), True)]],
    (fp32, (1, 2, 2 * 1100), False),  # two blocks of hidden units, the second with a masked tail
])
def test_swiglu_triton_values_and_gradients(dtype, shape, strided):
    g = torch.Generator().manual_seed(shape[-1])
    wide = (shape[0], 2 * shape[1], shape[-1] + 8) if strided else shape
    x = torch.randn(wide, generator=g, **f64).to(DEVICE, dtype)
    x = x[:, ::2, :shape[-1]] if strided else x
    assert_kernel_close(ops.swiglu, [x], [torch.randn(*shape[:-1], shape[-1] // 2, generator=g, **f64)])


@needs_triton
def test_add_rmsnorm_triton_backward_is_deterministic_and_s_is_not_h():
    h, delta, weight, (gs, gy) = low_inputs((2, 9, 80), (fp32, bf16, fp32), True, False, seed=0)
    with ops.use_kernels("triton"):
        grads = [run(lambda h, d, w: ops.add_rmsnorm(h, d, w, EPS), [h, delta, weight], [gs, gy])[2:] for _ in range(2)]
        s, _ = ops.add_rmsnorm(h, None, weight, EPS)
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert torch.equal(s, h) and s.data_ptr() != h.data_ptr()  # a custom op's output may not alias its input


class _Launches(TorchDispatchMode):
    """Counts launches of a kernel and records the torch ops issued around them (not inside: the
    Triton interpreter copies tensors with torch ops of its own)."""

    def __init__(self, kernel):
        super().__init__()
        self.kernel, self.count, self.ops, self.inside = kernel, 0, [], False

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.count, self.inside = self.count + 1, True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.inside = False
        return launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@needs_triton
def test_decode_step_and_swiglu_forward_are_one_launch(monkeypatch):
    """The decode step is launch-bound: one kernel and the outputs' allocations, nothing else."""
    from samba_lm.ops import triton_norm, triton_swiglu

    h, delta, weight, _ = low_inputs((4, 1, 80), (fp32, bf16, fp32), True, False, seed=1)
    x = torch.randn(2, 6, 88, device=DEVICE, dtype=bf16)[:, ::2, :80]
    for module, name, call in [(triton_norm, "_fwd_kernel", lambda: triton_norm.norm_forward(h, delta, weight, EPS)),
                               (triton_swiglu, "_swiglu_kernel", lambda: triton_swiglu.swiglu_forward(x))]:
        mode = _Launches(getattr(module, name))
        monkeypatch.setattr(module, name, mode)
        with torch.no_grad(), mode:
            call()
        assert mode.count == 1 and set(mode.ops) == {"aten.new_empty"}, (name, mode.ops)


@needs_triton
def test_custom_op_registration():
    """Schema, fake (meta) shapes and autograd registration of every new op, as torch.compile relies on them."""
    lib = torch.ops.samba_lm
    h = torch.randn(2, 3, 48, device=DEVICE, requires_grad=True)
    delta = torch.randn(2, 3, 48, device=DEVICE, dtype=bf16, requires_grad=True)
    weight = torch.rand(48, device=DEVICE, requires_grad=True)
    torch.library.opcheck(lib.add_rmsnorm_fwd.default, (h, delta, weight, EPS, None))
    torch.library.opcheck(lib.add_rmsnorm_fwd.default, (h, None, weight, EPS, None))
    torch.library.opcheck(lib.add_rmsnorm_fwd.default, (h, delta, weight, EPS, bf16))
    s, y, rstd = lib.add_rmsnorm_fwd(h.detach(), delta.detach(), weight.detach(), EPS, None)
    torch.library.opcheck(lib.add_rmsnorm_bwd.default, (torch.randn_like(y), torch.randn_like(s), s, rstd,
                                                         weight.detach(), bf16))
    torch.library.opcheck(lib.add_rmsnorm_bwd.default, (torch.randn_like(y), torch.randn_like(s), s, rstd,
                                                         weight.detach(), None))
    x = torch.randn(2, 6, 56, device=DEVICE, dtype=bf16)[:, ::2, :48]  # a strided view
    torch.library.opcheck(lib.swiglu_fwd.default, (x.detach().requires_grad_(True),))
    torch.library.opcheck(lib.swiglu_fwd.default, (x,))
    torch.library.opcheck(lib.swiglu_bwd.default, (torch.randn(2, 3, 24, device=DEVICE, dtype=bf16), x))


# ------------------------------------------------------------------ bad input
def _norm_args(**change):
    args = dict(h=torch.randn(2, 3, 8), delta=torch.randn(2, 3, 8), weight=torch.ones(8), eps=EPS)
    return {**args, **change}


@pytest.mark.parametrize("call, match", [
    (lambda: ops.add_rmsnorm(**_norm_args(h=torch.ones(2, 3, 8).long())), "add_rmsnorm: h must be a floating"),
    (lambda: ops.add_rmsnorm(**_norm_args(h=torch.tensor(1.0))), "add_rmsnorm: h must have layout"),
    (lambda: ops.add_rmsnorm(**_norm_args(delta=torch.randn(2, 3, 9))), "add_rmsnorm: delta has shape"),
    (lambda: ops.add_rmsnorm(**_norm_args(weight=torch.ones(9))), "add_rmsnorm: weight has shape"),
    (lambda: ops.add_rmsnorm(**_norm_args(weight=None)), "add_rmsnorm: weight is required"),
    (lambda: ops.add_rmsnorm(**_norm_args(eps=0.0)), "add_rmsnorm: eps must be a positive float"),
    (lambda: ops.add_rmsnorm(**_norm_args(eps="1e-5")), "add_rmsnorm: eps must be a positive float"),
    (lambda: ops.add_rmsnorm(**_norm_args(eps=True)), "add_rmsnorm: eps must be a positive float"),
    (lambda: ops.add_rmsnorm(**_norm_args(out_dtype=torch.int32)), "add_rmsnorm: out_dtype must be a floating"),
    (lambda: ops.add_layernorm(**_norm_args(out_dtype="bf16", bias=torch.ones(8))), "add_layernorm: out_dtype must"),
    (lambda: ops.add_layernorm(**_norm_args(bias=torch.ones(9))), "add_layernorm: bias has shape"),
    (lambda: ops.add_layernorm(**_norm_args(bias=None)), "add_layernorm: bias is required"),
    (lambda: ops.add_layernorm(**_norm_args(eps=-1.0, bias=torch.ones(8))), "add_layernorm: eps must be a positive"),
    (lambda: ops.swiglu(torch.randn(2, 7)), r"swiglu: x must have layout \[..., 2H\]"),
    (lambda: ops.swiglu(torch.ones(2, 8, dtype=torch.int32)), "swiglu: x must be a floating"),
])
def test_argument_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@needs_triton
def test_float64_runs_the_reference_and_forcing_triton_on_it_is_an_error():
    h, weight = torch.randn(2, 8, device=DEVICE), torch.ones(8, device=DEVICE, **f64)  # one float64 input suffices
    assert torch.equal(ops.add_rmsnorm(h, None, weight, EPS)[1], ops.add_rmsnorm_reference(h, None, weight, EPS)[1])
    with ops.use_kernels("triton"):
        with pytest.raises(RuntimeError, match="does not run"):
            ops.add_rmsnorm(h, None, weight, EPS)
        with pytest.raises(RuntimeError, match="does not run"):
            ops.swiglu(torch.randn(2, 8, device=DEVICE, **f64))
