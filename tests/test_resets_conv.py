"""Document resets in the causal conv1d (issue 19): a row of packed documents convolves each document as
if it ran alone (outputs, final state and every gradient), in the reference and in the Triton kernels
(forward, the fused and the two-pass backward, the decode step), whole or streamed in chunks.

The oracle runs each document by itself in float64: the first of a row continues initial_state
(unless the row resets at t = 0), every later one starts from zeros; the final state is what the last
document leaves. Triton tolerances follow tests/test_triton_kernels.py: the kernel's error against it
may be at most 3x the reference's in the same dtype, plus a little slack.
"""

import pytest
import torch
import torch.nn.functional as F

from samba_lm import ops

triton = pytest.importorskip("triton", reason="Triton kernels need the `triton` package (pip install triton)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_TILE = (4, 8, 1)  # with E = 12 and T up to 13: several time and channel tiles, the last ones partial
# The forward's and the fused backward's programs: 2 blocks of 2 steps, so resets fall on both sides of
# their edges (T = 9, K = 3: the last backward program's 3 steps).
SMALL = dict(fwd_tile=(2, 8, 1), fwd_tiles_per_program=2, fused_tile=(2, 8, 1), fused_tiles_per_program=2)
TWO_PASS = dict(bwd_tile=SMALL_TILE, fused_backward=False)


def alone(x, weight, bias, initial_state, reset):
    """Each document of each row run by itself (plain F.conv1d, no resets): (y [B, T, E], final [B, E, K-1])."""
    batch, T, E = x.shape
    K = weight.shape[1]
    ys, finals = [], []
    for b in range(batch):
        bounds = sorted({0, T, *reset[b].nonzero().flatten().tolist()})
        row = []
        for a, c in zip(bounds, bounds[1:]):
            continues = a == 0 and not reset[b, 0] and initial_state is not None
            past = initial_state[b] if continues else x.new_zeros(E, K - 1)
            xs = torch.cat([past, x[b, a:c].T], dim=-1)
            row.append(F.silu(F.conv1d(xs[None], weight[:, None, :], bias, groups=E)[0]).T)
        ys.append(torch.cat(row))
        finals.append(xs[:, xs.shape[-1] - (K - 1):])
    return torch.stack(ys), torch.stack(finals)


def flags(batch, T, starts):
    """reset [B, T] from the document starts of each row."""
    reset = torch.zeros(batch, T, dtype=torch.bool)
    for b, row in enumerate(starts):
        reset[b, list(row)] = True
    return reset


def conv_args(batch, T, E, K, seed, with_state):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = dict(x=r(batch, T, E), weight=r(E, K), bias=r(E), initial_state=r(batch, E, K - 1) if with_state else None)
    return args, r(batch, T, E), r(batch, E, K - 1)


def run(fn, args, reset, gy, gf):
    """y, final and the gradients of every float argument under loss = <y, gy> + <final, gf>."""
    leaves = {k: v.detach().clone().requires_grad_(True) if v is not None else None for k, v in args.items()}
    y, final = fn(**leaves, reset=reset)
    ((y.double() * gy.to(y.device)).sum() + (final.double() * gf.to(y.device)).sum()).backward()
    return dict(y=y.double(), final=final.double(),
                **{f"d{k}": v.grad.double() for k, v in leaves.items() if v is not None})


def rel_err(a, ref):
    return ((a.cpu().double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# (T, K, the document starts of each of 2 rows): a reset at t = 0; mid-chunk; adjacent starts, shorter
# than K, on both sides of a tile edge (4, 8, 12); a last document of one token (the final state nearly
# all zeros); a row reset everywhere; T < K-1, where the final state holds initial_state's slots.
CASES = [
    (13, 4, [(5,), ()]),
    (13, 4, [(0, 3, 4, 5), (1, 2, 12)]),
    (13, 4, [range(13), (6, 7, 8)]),
    (9, 3, [(3, 4), (8,)]),
    (2, 4, [(1,), (0,)]),
    (1, 4, [(0,), ()]),
]


@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("T, K, starts", CASES)
def test_reference_runs_each_document_alone(T, K, starts, with_state):
    batch, E = 2, 5
    args, gy, gf = conv_args(batch, T, E, K, seed=T * K, with_state=with_state)
    reset = flags(batch, T, starts)
    got = run(ops.causal_conv1d_reference, args, reset, gy, gf)
    want = run(lambda reset, **a: alone(**a, reset=reset), args, reset, gy, gf)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, msg=name)
    if with_state:  # nothing flows across a reset at t = 0
        assert torch.equal(got["dinitial_state"][reset[:, 0]], torch.zeros_like(got["dinitial_state"][reset[:, 0]]))


@pytest.mark.parametrize("conv, dtype", [({}, torch.float32),  # the default tiles, and many tiles a row
                                         (SMALL, torch.float32), (SMALL, torch.bfloat16), (TWO_PASS, torch.float32)],
                         ids=["shipped", "small", "small-bf16", "small-two-pass"])
@pytest.mark.parametrize("T, K, starts", CASES)
def test_triton_kernels_match_the_reference(T, K, starts, conv, dtype):
    batch, E = 2, 12
    args, gy, gf = conv_args(batch, T, E, K, seed=T + K, with_state=True)
    reset = flags(batch, T, starts)
    low = {k: v.to(DEVICE, dtype if k in ("x", "initial_state") else torch.float32) for k, v in args.items()}
    exact = run(lambda reset, **a: alone(**a, reset=reset), args, reset, gy, gf)
    with ops.use_kernels("reference"):
        ref = run(ops.causal_conv1d, low, reset.to(DEVICE), gy, gf)
    with ops.use_kernels("triton"), ops.tuned(conv=conv):
        tri = run(ops.causal_conv1d, low, reset.to(DEVICE), gy, gf)
    slack = 1e-6 if dtype == torch.float32 else 1e-3
    for name in exact:
        assert rel_err(tri[name], exact[name]) <= 3 * rel_err(ref[name], exact[name]) + slack, name
    cut = reset[:, 0].to(DEVICE)
    assert torch.equal(tri["dinitial_state"][cut], torch.zeros_like(tri["dinitial_state"][cut]))


@pytest.mark.parametrize("conv", [SMALL, TWO_PASS], ids=["fused", "two-pass"])
def test_triton_without_any_reset_is_bit_for_bit_the_plain_conv(conv):
    """reset=None, and all-False flags, run the same arithmetic as before resets existed."""
    args, gy, gf = conv_args(2, 13, 8, 4, seed=3, with_state=True)
    low = {k: v.to(DEVICE, torch.float32) for k, v in args.items()}
    with ops.use_kernels("triton"), ops.tuned(conv=conv):
        plain = run(lambda reset, **a: ops.causal_conv1d(**a), low, None, gy, gf)
        none = run(ops.causal_conv1d, low, None, gy, gf)
        unset = run(ops.causal_conv1d, low, torch.zeros(2, 13, dtype=torch.bool, device=DEVICE), gy, gf)
    for name in plain:
        assert torch.equal(none[name], plain[name]) and torch.equal(unset[name], plain[name]), name
    ref_unset = run(ops.causal_conv1d_reference, args, torch.zeros(2, 13, dtype=torch.bool), gy, gf)
    ref_plain = run(ops.causal_conv1d_reference, args, None, gy, gf)
    for name in ref_plain:
        torch.testing.assert_close(ref_unset[name], ref_plain[name], rtol=1e-12, atol=1e-12, msg=name)


def test_decode_step_zeroes_the_state_of_rows_that_reset():
    """One token at a time through the Triton step kernel (state updated in place) == the whole
    stream; rows reset at the first step, at consecutive steps, at the last, or never."""
    batch, T, E, K = 4, 10, 20, 4
    args, _, _ = conv_args(batch, T, E, K, seed=11, with_state=True)
    low = {k: v.to(DEVICE, torch.float32) for k, v in args.items()}
    reset = flags(batch, T, [(0, 5), (3, 4, 5), (9,), ()]).to(DEVICE)
    with torch.no_grad():
        y_ref, s_ref = ops.causal_conv1d_reference(**low, reset=reset)
        state, ys = low["initial_state"].clone(), []
        with ops.use_kernels("triton"):
            for t in range(T):
                y, out = ops.causal_conv1d(low["x"][:, t:t + 1], low["weight"], low["bias"], state, reset[:, t:t + 1])
                assert out is state
                ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, s_ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_chunked_stream_equals_the_whole_forward(backend):
    """The state carried between chunks, resets inside chunks, at a chunk's first token, in one-token
    chunks, and in the last K-1 tokens of a chunk; values and gradients (through the carried states)."""
    batch, T, E, K = 3, 16, 12, 4
    args, gy, gf = conv_args(batch, T, E, K, seed=5, with_state=True)
    low = {k: v.to(DEVICE, torch.float32) for k, v in args.items()}
    reset = flags(batch, T, [(0, 4, 7, 8, 11, 14), (2, 3, 12, 13), ()]).to(DEVICE)
    chunks = [(0, 1), (1, 4), (4, 5), (5, 11), (11, 12), (12, 16)]
    with ops.use_kernels(backend):
        whole = run(ops.causal_conv1d, low, reset, gy, gf)

        def streamed(x, weight, bias, initial_state, reset):
            ys, state = [], initial_state
            for a, c in chunks:
                y, state = ops.causal_conv1d(x[:, a:c], weight, bias, state, reset[:, a:c])
                ys.append(y)
            return torch.cat(ys, 1), state

        chunked = run(streamed, low, reset, gy, gf)
        with torch.no_grad():  # inference: one-token chunks take the decode step
            y_inf, s_inf = streamed(**{k: v.clone() for k, v in low.items()}, reset=reset)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(y_inf.double(), whole["y"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_inf.double(), whole["final"], rtol=1e-5, atol=1e-5)


def test_opcheck_with_reset():
    """The conv's custom ops with the new argument (schema, fakes, autograd, AOT dispatch)."""
    r = lambda *s, grad=False: torch.randn(*s, device=DEVICE).requires_grad_(grad)  # noqa: E731
    reset = flags(2, 19, [(0, 6, 7), (18,)]).to(DEVICE)
    x, w, b, s0 = r(2, 19, 24, grad=True), r(24, 4, grad=True), r(24, grad=True), r(2, 24, 3, grad=True)
    samba = torch.ops.samba_lm
    torch.library.opcheck(samba.causal_conv1d_fwd.default, (x, w, b, s0, reset))
    torch.library.opcheck(samba.causal_conv1d_fwd.default, (x, w, None, None, reset))
    torch.library.opcheck(samba.causal_conv1d_bwd.default,
                          (r(2, 19, 24), r(2, 24, 3), x.detach(), w.detach(), b.detach(), s0.detach(), reset))
    torch.library.opcheck(samba.causal_conv1d_step.default,
                          (r(2, 1, 24), w.detach(), b.detach(), r(2, 24, 3), reset[:, :1].contiguous()))


@pytest.mark.parametrize("reset, match", [
    (torch.zeros(2, 5, dtype=torch.int64), "reset must be a bool tensor"),
    (torch.zeros(2, 4, dtype=torch.bool), r"reset has shape \(2, 4\), expected \(2, 5\)"),
    (torch.zeros(2, 5, dtype=torch.bool, device="meta"), "reset is on meta"),
])
def test_bad_reset_is_a_clear_error(reset, match):
    with pytest.raises(ValueError, match=match):
        ops.causal_conv1d(torch.randn(2, 5, 3), torch.randn(3, 4), reset=reset)
