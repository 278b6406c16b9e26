"""Triton kernels against the float64 reference (on CPUs through TRITON_INTERPRET=1, on GPUs natively).

Tolerances follow flash-attention's rule: the kernel's error against float64 may be a small multiple
of the error of the reference computed in the kernel's own dtype.
"""

import pytest
import torch

from samba_lm import ops

triton = pytest.importorskip("triton", reason="Triton kernels need the `triton` package (pip install triton)")
from samba_lm.ops import triton_scan, tuning  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def scan_args(batch, T, E, N, dtype, seed, with_h0=True, with_z=True, with_D=True, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = dict(u=r(batch, T, E), delta=r(batch, T, E) - 1.0, A=-torch.rand(E, N, generator=g, dtype=torch.float64) * 4,
                B=r(batch, T, N), C=r(batch, T, N), D=r(E) if with_D else None, z=r(batch, T, E) if with_z else None,
                delta_bias=r(E) * 0.5 if with_bias else None, initial_state=r(batch, E, N) if with_h0 else None)
    low = {k: None if v is None else v.to(DEVICE, torch.float32 if k in ("A", "D", "delta_bias", "initial_state") else dtype)
           for k, v in args.items()}
    return args, low


def run(fn, args, grad_out, grad_final):
    leaves = {k: v.detach().clone().requires_grad_(True) if v is not None else None for k, v in args.items()}
    y, final = fn(**leaves)
    loss = (y.double() * grad_out).sum() + (final.double() * grad_final).sum()
    loss.backward()
    return y.double(), final.double(), {k: v.grad.double() for k, v in leaves.items() if v is not None}


def rel_err(a, ref):
    return ((a.cpu().double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture(params=["chunked", "sequential", "sequential+backward", "sequential-1step+backward"])
def forward_kernel(request):
    """Every kernel: the dispatcher picks by how many programs fill the GPU; switches choose the
    backward after a step-at-a-time forward, and its steps per loop iteration (time segments: below)."""
    with ops.tuned(scan=dict(sequential_min_programs_per_sm=0 if "sequential" in request.param else 10**9,
                             training_segment_below_programs_per_sm=0,
                             sequential_backward=request.param.endswith("backward"),
                             sequential_steps=1 if "1step" in request.param else 2)):
        yield request.param


# Training with few rows: time segments of at least 8 steps, forward and backward, as many as T allows.
TRAINING_SEGMENTS = dict(training_segment_below_programs_per_sm=10**6, sequential_min_segment=8,
                         sequential_segment_programs_per_sm=10**6, backward_segment_programs_per_sm=10**6)


@pytest.mark.parametrize("T, dtype, flags", [
    (1, torch.float32, {}),
    (37, torch.float32, {"with_h0": False}),
    (130, torch.float32, {"with_z": False, "with_D": False, "with_bias": False}),
    (70, torch.bfloat16, {}),
    (45, torch.float16, {"with_h0": False}),
])
def test_scan_values_and_gradients(T, dtype, flags, forward_kernel):
    batch, E, N = 2, 6, 4
    exact, low = scan_args(batch, T, E, N, dtype, seed=T, **flags)
    g = torch.Generator().manual_seed(99)
    gy = torch.randn(batch, T, E, generator=g, dtype=torch.float64)
    gf = torch.randn(batch, E, N, generator=g, dtype=torch.float64)
    y64, f64, d64 = run(ops.selective_scan_reference, exact, gy, gf)
    with ops.use_kernels("reference"):
        y_ref, f_ref, d_ref = run(ops.selective_scan, low, gy.to(DEVICE), gf.to(DEVICE))
    with ops.use_kernels("triton"):
        y_tri, f_tri, d_tri = run(ops.selective_scan, low, gy.to(DEVICE), gf.to(DEVICE))
    slack = 1e-6 if dtype == torch.float32 else 1e-3
    for name, tri, ref, exact_ in [("y", y_tri, y_ref, y64), ("final", f_tri, f_ref, f64)] + [
            (f"d{k}", d_tri[k], d_ref[k], d64[k]) for k in d64]:
        assert rel_err(tri, exact_) <= 3 * rel_err(ref, exact_) + slack, name


def test_scan_time_segments_in_training(T=37, dtype=torch.float32):
    """Forward and backward in time segments (37 steps: 3 of 16, the last short; each backward segment
    two carry segments of 8), against float64, and the backward deterministic run to run."""
    exact, low = scan_args(2, T, 6, 4, dtype, seed=T)
    g = torch.Generator().manual_seed(5)
    gy, gf = torch.randn(2, T, 6, generator=g, dtype=torch.float64), torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    y64, f64, d64 = run(ops.selective_scan_reference, exact, gy, gf)
    with ops.use_kernels("reference"):
        y_ref, f_ref, d_ref = run(ops.selective_scan, low, gy.to(DEVICE), gf.to(DEVICE))
    with ops.use_kernels("triton"), ops.tuned(scan=TRAINING_SEGMENTS):
        assert triton_scan._segments(tuning.current("scan"), 2, 6, T, torch.device(DEVICE), training=True) > 2
        y_tri, f_tri, d_tri = run(ops.selective_scan, low, gy.to(DEVICE), gf.to(DEVICE))
        _, _, d_again = run(ops.selective_scan, low, gy.to(DEVICE), gf.to(DEVICE))
    slack = 1e-6 if dtype == torch.float32 else 1e-3
    for name, tri, ref, exact_ in [("y", y_tri, y_ref, y64), ("final", f_tri, f_ref, f64)] + [
            (f"d{k}", d_tri[k], d_ref[k], d64[k]) for k in d64]:
        assert rel_err(tri, exact_) <= 3 * rel_err(ref, exact_) + slack, name
    for k in d_tri:
        assert torch.equal(d_tri[k], d_again[k]), k


@pytest.mark.parametrize("N", [12, 16])
def test_scan_backward_warp_sums(N):
    """d_state 16 (Samba's): on a GPU the step-at-a-time backward sums dB and dC over a warp with a
    PTX reduce-scatter; 40 channels leave a warp partly masked, N=12 leaves states padded."""
    exact, low = scan_args(2, 21, 40, N, torch.bfloat16, seed=N)
    g = torch.Generator().manual_seed(7)
    gy, gf = torch.randn(2, 21, 40, generator=g, dtype=torch.float64), torch.randn(2, 40, N, generator=g, dtype=torch.float64)
    _, _, d64 = run(ops.selective_scan_reference, exact, gy, gf)
    with ops.use_kernels("reference"):
        _, _, d_ref = run(ops.selective_scan, low, gy.to(DEVICE), gf.to(DEVICE))
    with ops.use_kernels("triton"), ops.tuned(scan=dict(sequential_min_programs_per_sm=0, sequential_backward=True)):
        _, _, d_tri = run(ops.selective_scan, low, gy.to(DEVICE), gf.to(DEVICE))
    for k in d64:
        assert rel_err(d_tri[k], d64[k]) <= 3 * rel_err(d_ref[k], d64[k]) + 1e-3, k


def test_scan_chunked_equals_whole_and_backward_is_deterministic(forward_kernel):
    _, low = scan_args(2, 72, 8, 4, torch.float32, seed=3)
    with ops.use_kernels("triton"):
        y, final = ops.selective_scan(**low)
        ys, state = [], low["initial_state"]
        for a, b in [(0, 1), (1, 64), (64, 67), (67, 72)]:  # ragged against the chunks and carries
            part = {k: (v[:, a:b] if k in ("u", "delta", "B", "C", "z") else v) for k, v in low.items()}
            yc, state = ops.selective_scan(**{**part, "initial_state": state})
            ys.append(yc)
        torch.testing.assert_close(torch.cat(ys, 1), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, final, rtol=1e-5, atol=1e-5)
        gy = torch.randn_like(y)
        grads = []
        for _ in range(2):
            leaves = {k: v.clone().requires_grad_(True) for k, v in low.items()}
            out, _ = ops.selective_scan(**leaves)
            out.backward(gy)
            grads.append([v.grad for v in leaves.values()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# The defaults, and small tiles: many time and channel blocks (E = 70: the last partial), programs of
# 3 blocks of 8 steps (T = 77, K = 4: the last backward program's 8) or 5 of 4, or the two passes.
CONV_TUNINGS = {"shipped": {},
                "small": dict(fwd_tile=(8, 64, 1), fwd_tiles_per_program=3, fused_tile=(8, 64, 1),
                              fused_tiles_per_program=3),
                "smaller": dict(fwd_tile=(4, 32, 1), fwd_tiles_per_program=5, fused_tile=(4, 64, 1),
                                fused_tiles_per_program=5),
                "small, two passes": dict(bwd_tile=(16, 32, 2), fused_backward=False)}


@pytest.mark.parametrize("T, K, dtype, with_state", [(1, 4, torch.float32, True), (2, 4, torch.float32, True),
                                                     (77, 4, torch.float32, False), (70, 3, torch.bfloat16, True)])
@pytest.mark.parametrize("conv", CONV_TUNINGS.values(), ids=CONV_TUNINGS.keys())
def test_conv_values_and_gradients(T, K, dtype, with_state, conv):
    batch, E = 2, 70
    g = torch.Generator().manual_seed(T + K)
    exact = dict(x=torch.randn(batch, T, E, generator=g, dtype=torch.float64),
                 weight=torch.randn(E, K, generator=g, dtype=torch.float64),
                 bias=torch.randn(E, generator=g, dtype=torch.float64),
                 initial_state=torch.randn(batch, E, K - 1, generator=g, dtype=torch.float64) if with_state else None)
    low = {k: None if v is None else v.to(DEVICE, dtype if k in ("x", "initial_state") else torch.float32)
           for k, v in exact.items()}
    gy = torch.randn(batch, T, E, generator=g, dtype=torch.float64)
    gf = torch.randn(batch, E, K - 1, generator=g, dtype=torch.float64)

    def go(fn, args):
        leaves = {k: v.detach().clone().requires_grad_(True) if v is not None else None for k, v in args.items()}
        y, final = fn(**leaves)
        ((y.double() * gy.to(y.device)).sum() + (final.double() * gf.to(y.device)).sum()).backward()
        return [y.double(), final.double()] + [leaves[k].grad.double() for k in leaves if leaves[k] is not None]

    exact_out = go(ops.causal_conv1d_reference, exact)
    with ops.use_kernels("reference"):
        ref_out = go(ops.causal_conv1d, low)
    with ops.use_kernels("triton"), ops.tuned(conv=conv):
        tri_out = go(ops.causal_conv1d, low)
    slack = 1e-6 if dtype == torch.float32 else 1e-3
    for i, (tri, ref, ex) in enumerate(zip(tri_out, ref_out, exact_out)):
        assert rel_err(tri, ex) <= 3 * rel_err(ref, ex) + slack, i


def test_decode_steps_update_the_state_in_place_and_match_the_reference():
    """One token at a time through the Triton step kernels == the reference on the whole stream."""
    batch, T, E, N, K = 3, 9, 20, 16, 4
    _, low = scan_args(batch, T, E, N, torch.float32, seed=5)
    x = torch.randn(batch, T, E, device=DEVICE)
    w, bias = torch.randn(E, K, device=DEVICE), torch.randn(E, device=DEVICE)
    conv0 = torch.randn(batch, E, K - 1, device=DEVICE)
    with torch.no_grad():
        y_ref, h_ref = ops.selective_scan_reference(**low)
        c_ref, s_ref = ops.causal_conv1d_reference(x, w, bias, conv0)
        h, s = low["initial_state"].clone(), conv0.clone()
        ys, cs = [], []
        with ops.use_kernels("triton"):
            for t in range(T):
                step = {k: (v[:, t:t + 1] if k in ("u", "delta", "B", "C", "z") else v) for k, v in low.items()}
                y, h_out = ops.selective_scan(**{**step, "initial_state": h})
                c, s_out = ops.causal_conv1d(x[:, t:t + 1], w, bias, s)
                assert h_out is h and s_out is s  # updated in place
                ys.append(y)
                cs.append(c)
    torch.testing.assert_close(torch.cat(ys, 1), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(cs, 1), c_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=1e-6)


def test_model_streams_through_the_triton_kernels():
    """The state invariant with the Triton backend (scan, conv, RoPE, sliding-window and full attention,
    decode): chunked and token-by-token equal the full forward."""
    import samba_lm

    from conftest import small_config

    torch.manual_seed(0)
    # head_dim 16: the smallest the attention kernels take (a forced backend never falls back)
    model = samba_lm.SambaLM(small_config(layers=("mamba", "mlp", "swa", "mlp", "attn", "mlp"), head_dim=16))
    model = model.to(DEVICE).eval()
    ids = torch.randint(0, 97, (2, 21), device=DEVICE)
    with torch.no_grad(), ops.use_kernels("triton"):
        full = model(ids).logits
        state = model.init_state(2)  # the first token decodes against an empty cache
        parts = [model(ids[:, a:b], state=state).logits for a, b in [(0, 1), (1, 6), (6, 13)]]
        parts += [model(ids[:, t:t + 1], state=state).logits for t in range(13, 21)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


def test_forcing_triton_where_it_cannot_run_is_an_error():
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    with ops.use_kernels("triton"), pytest.raises(RuntimeError, match="does not run"):
        ops.causal_conv1d(x, torch.randn(4, 4, dtype=torch.float64))
    q, k = torch.randn(1, 3, 2, 8, device=DEVICE), torch.randn(1, 3, 1, 8, device=DEVICE)
    pos = torch.arange(3, device=DEVICE)[None]
    with ops.use_kernels("triton"), pytest.raises(RuntimeError, match="does not run head_dim 8"):
        ops.attention(q, k, k, pos, 2)
    torch.testing.assert_close(ops.attention(q, k, k, pos, 2), ops.attention_reference(q, k, k, pos, 2))
