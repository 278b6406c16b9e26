"""Document resets in the selective scan and the Mamba mixer (issue 19): a packed row gives, for each
document, the outputs, final state and gradients of that document run alone.

The oracle runs each document by itself through a float64 loop, in one autograd graph over the same
leaves, so its gradients are those of the documents alone, summed where they share a parameter. Every
Triton path is forced with `ops.tuned(scan=...)` (on CPUs through TRITON_INTERPRET=1); tolerances as
in test_triton_kernels.py: at most 3x the reference's own error in the kernel's dtype, plus slack.
"""

import pytest
import torch
import torch.nn.functional as F

from samba_lm import ops

triton = pytest.importorskip("triton", reason="Triton kernels need the `triton` package (pip install triton)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCAN_STATE_ARGS = ("A", "D", "delta_bias", "initial_state")  # float32 whatever the inputs' dtype

# One row per case, T = 37 (the chunked kernels' chunks are 16 steps, the step-at-a-time carries 8).
RESETS = [
    [0, 5, 6, 16, 17, 30, 36],  # t = 0 (initial_state ignored), mid-chunk, adjacent, a chunk's edge, the last step
    [],                         # one document, continuing initial_state
    "all",                      # every token a document of its own
    [4],                        # a reset inside the first time segment only, at an even step
    [21],                       # one inside the second only, at an odd step (two steps per loop iteration)
]
PATHS = {  # the scan's kernels: forward, then backward
    "chunked": dict(sequential_min_programs_per_sm=10**9, training_segment_below_programs_per_sm=0),
    "step-at-a-time, chunked backward": dict(sequential_min_programs_per_sm=0, sequential_backward=False),
    "step-at-a-time": dict(sequential_min_programs_per_sm=0, sequential_backward=True),
    "step-at-a-time, 1 step": dict(sequential_min_programs_per_sm=0, sequential_backward=True, sequential_steps=1),
}
SEGMENTS = dict(sequential_min_segment=8, sequential_segment_programs_per_sm=10**6)  # inference, few rows
TRAINING_SEGMENTS = dict(SEGMENTS, training_segment_below_programs_per_sm=10**6, backward_segment_programs_per_sm=10**6)


def reset_mask(T, rows=RESETS):
    reset = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, starts in enumerate(rows):
        if starts == "all":
            reset[b] = True
        else:
            reset[b, [t for t in starts if t < T]] = True
    return reset


def scan_args(T, E, N, seed, with_h0=True, rows=RESETS):
    g = torch.Generator().manual_seed(seed)
    batch = len(rows)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(u=r(batch, T, E), delta=r(batch, T, E) - 1.0, A=-torch.rand(E, N, generator=g, dtype=torch.float64) * 4,
                B=r(batch, T, N), C=r(batch, T, N), D=r(E), z=r(batch, T, E), delta_bias=r(E) * 0.5,
                initial_state=r(batch, E, N) if with_h0 else None, reset=reset_mask(T, rows))


def lowered(args, dtype):
    """The inputs in `dtype` on DEVICE (A, D, delta_bias and the state in float32, as the model has them)."""
    return {k: None if v is None else v.to(DEVICE) if not v.is_floating_point()
            else v.to(DEVICE, torch.float32 if k in SCAN_STATE_ARGS else dtype) for k, v in args.items()}


def leaves_of(args):
    return {k: v.detach().clone().requires_grad_(True) if v is not None and v.is_floating_point() else v
            for k, v in args.items()}


def grads_of(leaves):
    return {k: v.grad.double().cpu() for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def documents(reset_row):
    """[(start, end)] of a row's documents; the first may continue the initial state."""
    starts = [0] + [t for t in range(1, len(reset_row)) if reset_row[t]]
    return list(zip(starts, starts[1:] + [len(reset_row)]))


def naive_scan(u, delta, A, B, C, D, z, delta_bias, h):
    """One row, one document, a step at a time in float64: u [T, E], h [E, N]."""
    ys = []
    for t in range(u.shape[0]):
        dt = F.softplus(delta[t] + delta_bias)
        h = torch.exp(dt[:, None] * A) * h + (dt * u[t])[:, None] * B[t][None, :]
        ys.append((h @ C[t] + D * u[t]) * F.silu(z[t]))
    return torch.stack(ys), h


def run_alone(args, gy, gf):
    """The oracle: each document of each row alone; y, final state, and the gradients of
    sum(y gy) + sum(final gf) with respect to every input."""
    leaves = leaves_of(args)
    batch, T, E = args["u"].shape
    ys, finals = torch.zeros(batch, T, E, dtype=torch.float64), []
    loss = 0.0
    for b in range(batch):
        for start, end in documents(args["reset"][b]):
            continues = start == 0 and not args["reset"][b, 0] and leaves["initial_state"] is not None
            h = leaves["initial_state"][b] if continues else torch.zeros(E, args["A"].shape[1], dtype=torch.float64)
            row = {k: leaves[k][b, start:end] for k in ("u", "delta", "B", "C", "z")}
            y, h = naive_scan(row["u"], row["delta"], leaves["A"], row["B"], row["C"], leaves["D"], row["z"],
                              leaves["delta_bias"], h)
            ys[b, start:end] = y.detach()
            loss = loss + (y * gy[b, start:end]).sum()
        finals.append(h.detach())
        loss = loss + (h * gf[b]).sum()
    loss.backward()
    return ys, torch.stack(finals), grads_of(leaves)


def run_packed(fn, args, gy, gf):
    leaves = leaves_of(args)
    y, final = fn(**leaves)
    ((y.double() * gy.to(y.device)).sum() + (final.double() * gf.to(y.device)).sum()).backward()
    return y.double().cpu(), final.double().cpu(), grads_of(leaves)


def rel_err(a, ref):
    return ((a.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def cotangents(args, seed=99):
    g = torch.Generator().manual_seed(seed)
    batch, T, E = args["u"].shape
    return (torch.randn(batch, T, E, generator=g, dtype=torch.float64),
            torch.randn(batch, E, args["A"].shape[1], generator=g, dtype=torch.float64))


# ----------------------------------------------------------------------------- the scan


@pytest.mark.parametrize("with_h0", [True, False])
def test_the_reference_runs_each_document_alone(with_h0):
    args = scan_args(37, 5, 3, seed=1, with_h0=with_h0)
    gy, gf = cotangents(args)
    y0, f0, d0 = run_alone(args, gy, gf)
    y, f, d = run_packed(ops.selective_scan_reference, args, gy, gf)
    torch.testing.assert_close(y, y0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f, f0, rtol=1e-10, atol=1e-12)
    assert d.keys() == d0.keys()
    for k in d0:
        torch.testing.assert_close(d[k], d0[k], rtol=1e-10, atol=1e-12, msg=k)
    if with_h0:  # nothing flows across a reset: rows reset at t = 0 give their initial state no gradient
        dropped = d["initial_state"][args["reset"][:, 0]]
        assert len(dropped) == 2 and torch.equal(dropped, torch.zeros_like(dropped))
        assert d["initial_state"][1].abs().sum() > 0


@pytest.mark.parametrize("T, dtype, with_h0", [(37, torch.float32, True), (37, torch.bfloat16, False)])
@pytest.mark.parametrize("path", PATHS)
def test_every_triton_path_runs_each_document_alone(T, dtype, with_h0, path):
    args = scan_args(T, 6, 4, seed=T, with_h0=with_h0)
    gy, gf = cotangents(args)
    y64, f64, d64 = run_alone(args, gy, gf)
    low = lowered(args, dtype)
    with ops.use_kernels("reference"):
        y_ref, f_ref, d_ref = run_packed(ops.selective_scan, low, gy, gf)
    with ops.use_kernels("triton"), ops.tuned(scan=PATHS[path]):
        y_tri, f_tri, d_tri = run_packed(ops.selective_scan, low, gy, gf)
    slack = 1e-6 if dtype == torch.float32 else 1e-3
    for name, tri, ref, exact in [("y", y_tri, y_ref, y64), ("final", f_tri, f_ref, f64)] + [
            (f"d{k}", d_tri[k], d_ref[k], d64[k]) for k in d64]:
        assert rel_err(tri, exact) <= 3 * rel_err(ref, exact) + slack, name
    if with_h0:
        dropped = d_tri["initial_state"][args["reset"][:, 0]]
        assert torch.equal(dropped, torch.zeros_like(dropped))


@pytest.mark.parametrize("with_h0", [True, False])
def test_the_time_segments_run_each_document_alone(with_h0):
    """An inference forward with few rows walks time in segments, twice: a segment holding a reset
    forgets the state entering it, one without carries it on (rows 3 and 4 of RESETS)."""
    from samba_lm.ops import triton_scan, tuning

    args = scan_args(37, 8, 4, seed=7, with_h0=with_h0)
    y64, f64, _ = run_alone(args, *cotangents(args))
    with torch.no_grad(), ops.use_kernels("triton"), ops.tuned(scan=SEGMENTS):
        # 4 asked for, walked as [0, 16), [16, 32), [32, 37): segments hold whole carry steps
        assert triton_scan._segments(tuning.current("scan"), 5, 8, 37, torch.device(DEVICE)) == 4
        y, f = ops.selective_scan(**lowered(args, torch.float32))
    assert rel_err(y, y64) < 1e-5 and rel_err(f, f64) < 1e-5


def test_the_training_time_segments_run_each_document_alone():
    """Training with few rows: forward and backward in time segments ([0, 16), [16, 32), [32, 37)),
    the backward's combining each later segment's state gradient unless a reset cut it off."""
    args = scan_args(37, 6, 4, seed=11)
    gy, gf = cotangents(args)
    y64, f64, d64 = run_alone(args, gy, gf)
    low = lowered(args, torch.float32)
    with ops.use_kernels("reference"):
        y_ref, f_ref, d_ref = run_packed(ops.selective_scan, low, gy, gf)
    with ops.use_kernels("triton"), ops.tuned(scan=TRAINING_SEGMENTS):
        y_tri, f_tri, d_tri = run_packed(ops.selective_scan, low, gy, gf)
    for name, tri, ref, exact in [("y", y_tri, y_ref, y64), ("final", f_tri, f_ref, f64)] + [
            (f"d{k}", d_tri[k], d_ref[k], d64[k]) for k in d64]:
        assert rel_err(tri, exact) <= 3 * rel_err(ref, exact) + 1e-6, name


def test_a_stream_of_chunks_and_decode_steps_runs_each_document_alone():
    """A chunk, then one token at a time through the decode kernel (the state updated in place), with
    resets anywhere: each step after a reset is a fresh stream's."""
    args = scan_args(29, 20, 16, seed=5)
    y64, f64, _ = run_alone(args, *cotangents(args))
    low = lowered(args, torch.float32)
    split = 13
    with torch.no_grad(), ops.use_kernels("triton"):
        y, h = ops.selective_scan(**{k: v[:, :split] if k in ("u", "delta", "B", "C", "z", "reset") else v
                                     for k, v in low.items()})
        ys = [y]
        for t in range(split, 29):
            step = {k: v[:, t:t + 1] if k in ("u", "delta", "B", "C", "z", "reset") else v for k, v in low.items()}
            y, h_out = ops.selective_scan(**{**step, "initial_state": h})
            assert h_out is h  # the decode kernel ran: in place
            ys.append(y)
    assert rel_err(torch.cat(ys, 1), y64) < 1e-5 and rel_err(h, f64) < 1e-5


@pytest.mark.parametrize("path", ["reference", *PATHS, "time segments", "decode step"])
def test_a_state_that_a_reset_drops_may_hold_nan(path):
    """Rows reset at t = 0 ignore their initial state, even a NaN one: the state is dropped, not
    multiplied by a zero decay; its gradient is zero, not NaN."""
    T = 1 if path == "decode step" else 21
    # No reset at the second time segment's start (16): the NaN reaches the segments' combination.
    args = scan_args(T, 6, 4, seed=11, rows=[[0, 5], [], [0, 9, 10], "all"])
    low = lowered(args, torch.float32)
    nan_rows = low["reset"][:, 0].clone()
    zeros = dict(low, initial_state=low["initial_state"].masked_fill(nan_rows[:, None, None], 0.0))
    nans = dict(low, initial_state=low["initial_state"].masked_fill(nan_rows[:, None, None], float("nan")))
    backend = "reference" if path == "reference" else "triton"
    with ops.use_kernels(backend), ops.tuned(scan=PATHS.get(path, SEGMENTS)):
        if path in ("reference", *PATHS):
            gy, gf = cotangents(args)
            expected, got = run_packed(ops.selective_scan, zeros, gy, gf), run_packed(ops.selective_scan, nans, gy, gf)
            dropped = got[2]["initial_state"][nan_rows.cpu()]
            assert torch.equal(dropped, torch.zeros_like(dropped))
        else:
            with torch.no_grad():
                expected = ops.selective_scan(**{**zeros, "initial_state": zeros["initial_state"].clone()})
                got = ops.selective_scan(**nans)
    for a, b in zip(got[:2], expected[:2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", [*PATHS, "time segments", "decode step"])
def test_no_resets_is_reset_none(path):
    """An all-False reset runs the reset kernels (HAS_RESET) and changes nothing; reset=None is the default."""
    T = 1 if path == "decode step" else 37
    args = lowered(scan_args(T, 6, 4, seed=2), torch.float32)
    quiet = dict(args, reset=torch.zeros_like(args["reset"]))
    plain = {k: v for k, v in args.items() if k != "reset"}
    with torch.no_grad(), ops.use_kernels("triton"), ops.tuned(scan=PATHS.get(path, SEGMENTS)):
        y0, f0 = ops.selective_scan(**{**plain, "initial_state": plain["initial_state"].clone()})
        y1, f1 = ops.selective_scan(**{**quiet, "initial_state": quiet["initial_state"].clone()})
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f1, f0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["selective_scan", "mamba_inner"])
@pytest.mark.parametrize("reset, match", [
    (torch.zeros(5, 37, dtype=torch.int64), "reset must be a bool tensor"),
    (torch.zeros(5, 36, dtype=torch.bool), r"reset has shape \(5, 36\), expected \(5, 37\)"),
    ([True] * 37, "reset must be a bool tensor"),
])
def test_a_bad_reset_is_refused_by_name(op, reset, match):
    if op == "selective_scan":
        args = dict(scan_args(37, 6, 4, seed=0), reset=reset)
        call = lambda: ops.selective_scan(**args)  # noqa: E731
    else:
        args = dict(mamba_args(5, 37, seed=0), reset=reset)
        call = lambda: ops.mamba_inner(**args)  # noqa: E731
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- the Mamba mixer


def mamba_args(batch, T, seed, E=8, N=4, K=4, R=3, with_state=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(xz=r(batch, T, 2 * E), positions=None, conv_weight=r(E, K), conv_bias=r(E),
                x_proj_weight=r(R + 2 * N, E) * 0.3, dt_proj_weight=r(E, R) * 0.3, dt_proj_bias=r(E) * 0.3 - 1,
                A_log=torch.rand(E, N, generator=g, dtype=torch.float64), D=r(E),
                conv_state=r(batch, E, K - 1) if with_state else None,
                ssm_state=r(batch, E, N) if with_state else None)


def mamba_alone(args, reset, gy):
    """The oracle: each document of each row through mamba_inner_reference alone (float64); y, the
    final states, and the gradients of sum(y gy) + sum(final states) with respect to every input."""
    leaves = leaves_of(args)
    batch, T, _ = args["xz"].shape
    ys, conv_f, ssm_f, loss = [], [], [], 0.0
    for b in range(batch):
        row_ys = []
        for start, end in documents(reset[b]):
            continues = start == 0 and not reset[b, 0] and leaves["ssm_state"] is not None
            states = {k: leaves[k][b:b + 1] if continues else torch.zeros_like(args[k][b:b + 1])
                      for k in ("conv_state", "ssm_state")} if leaves["ssm_state"] is not None else {}
            y, conv, ssm = ops.mamba_inner_reference(**{**leaves, "xz": leaves["xz"][b:b + 1, start:end], **states})
            row_ys.append(y)
            loss = loss + (y * gy[b:b + 1, start:end]).sum()
        ys.append(torch.cat(row_ys, 1).detach())
        conv_f.append(conv.detach())
        ssm_f.append(ssm.detach())
        loss = loss + conv.sum() + ssm.sum()
    loss.backward()
    return torch.cat(ys), torch.cat(conv_f), torch.cat(ssm_f), grads_of(leaves)


def mamba_packed(args, reset, gy):
    leaves = leaves_of(args)
    y, conv, ssm = ops.mamba_inner(**leaves, reset=reset.to(args["xz"].device))
    ((y.double() * gy.to(y.device)).sum() + conv.double().sum() + ssm.double().sum()).backward()
    return y.double().cpu(), conv.double().cpu(), ssm.double().cpu(), grads_of(leaves)


@pytest.mark.parametrize("with_state", [True, False])
def test_mamba_inner_runs_each_document_alone(with_state):
    """The reference in float64, then the Triton backend (conv and scan kernels) in float32."""
    args = mamba_args(5, 24, seed=3, with_state=with_state)
    reset = reset_mask(24)
    gy = torch.randn(5, 24, 8, dtype=torch.float64)
    expected = mamba_alone(args, reset, gy)
    with ops.use_kernels("reference"):
        got = mamba_packed(args, reset, gy)
    for name, a, b in zip(("y", "conv_state", "ssm_state"), got[:3], expected[:3]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    for k in expected[3]:
        torch.testing.assert_close(got[3][k], expected[3][k], rtol=1e-10, atol=1e-12, msg=k)
    low = {k: v.to(DEVICE, torch.float32) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with ops.use_kernels("reference"):
        ref = mamba_packed(low, reset, gy)
    with ops.use_kernels("triton"), ops.tuned(scan=PATHS["step-at-a-time"]):
        tri = mamba_packed(low, reset, gy)
    for i, name in enumerate(("y", "conv_state", "ssm_state")):
        assert rel_err(tri[i], expected[i]) <= 3 * rel_err(ref[i], expected[i]) + 1e-6, name
    for k in expected[3]:
        assert rel_err(tri[3][k], expected[3][k]) <= 3 * rel_err(ref[3][k], expected[3][k]) + 1e-6, k


def test_the_mamba_decode_step_after_a_reset_is_a_fresh_stream():
    """The fused decode kernels: rows reset at this token step as from zero states, the others as
    before; their states are updated in place. Then a packed stream token by token == the reference
    on the whole row."""
    args = mamba_args(5, 1, seed=4)
    reset = torch.tensor([[True], [False], [True], [False], [True]])
    fresh = dict(args, conv_state=args["conv_state"].masked_fill(reset[:, :, None], 0.0),
                 ssm_state=args["ssm_state"].masked_fill(reset[:, :, None], 0.0))
    y_ref, conv_ref, ssm_ref = ops.mamba_inner_reference(**fresh)
    low = {k: v.to(DEVICE, torch.float32) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with torch.no_grad(), ops.use_kernels("triton"), ops.tuned(mamba_step=dict(tile=(16, 8, 4, 8, 2))):
        conv, ssm = low["conv_state"], low["ssm_state"]
        y, conv_out, ssm_out = ops.mamba_inner(**low, reset=reset.to(DEVICE))
    assert conv_out is conv and ssm_out is ssm
    assert rel_err(y, y_ref) < 1e-5 and rel_err(conv, conv_ref) < 1e-6 and rel_err(ssm, ssm_ref) < 1e-5

    T = 20
    args = mamba_args(5, T, seed=6)
    reset = reset_mask(T)
    y_ref, conv_ref, ssm_ref = ops.mamba_inner_reference(**args, reset=reset)
    low = {k: v.to(DEVICE, torch.float32) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    ys = []
    with torch.no_grad(), ops.use_kernels("triton"):
        for t in range(T):
            y, _, _ = ops.mamba_inner(**{**low, "xz": low["xz"][:, t:t + 1]}, reset=reset[:, t:t + 1].to(DEVICE))
            ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_ref) < 1e-5
    assert rel_err(low["conv_state"], conv_ref) < 1e-6 and rel_err(low["ssm_state"], ssm_ref) < 1e-5


# ----------------------------------------------------------------------------- custom ops


def _scan_scenario(T, grad):
    def scenario():
        args = lowered(scan_args(T, 8, 4, seed=T, rows=RESETS[:3]), torch.float32)
        if grad:
            leaves = leaves_of(args)
            y, h = ops.selective_scan(**leaves)
            (y.sum() + h.sum()).backward()
        else:
            with torch.no_grad():
                ops.selective_scan(**args)
    return scenario


def _mamba_decode_scenario():
    args = {k: v.to(DEVICE, torch.float32) if isinstance(v, torch.Tensor) else v
            for k, v in mamba_args(5, 1, seed=0).items()}
    with torch.no_grad():
        ops.mamba_inner(**args, reset=torch.tensor([True, False, True, False, False], device=DEVICE)[:, None])


OPCHECK_SCENARIOS = {
    "scan, chunked, training": (_scan_scenario(9, grad=True), dict(scan=PATHS["chunked"])),
    "scan, step at a time, training": (_scan_scenario(9, grad=True), dict(scan=PATHS["step-at-a-time"])),
    "scan, time segments, inference": (_scan_scenario(17, grad=False), dict(scan=SEGMENTS)),
    "scan, decode step": (_scan_scenario(1, grad=False), {}),
    "mamba decode step": (_mamba_decode_scenario, {}),
}


@pytest.mark.parametrize("scenario", OPCHECK_SCENARIOS)
def test_the_custom_ops_called_with_resets_pass_opcheck(scenario):
    """As tests/test_opcheck.py, for the calls that carry a reset tensor."""
    from test_opcheck import recorded

    fn, tuning = OPCHECK_SCENARIOS[scenario]
    with ops.tuned(**tuning):
        calls = recorded(fn)
        assert calls
        for func, args, kwargs in calls:
            assert any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args), func  # with the reset
            differentiable = torch._library.custom_ops.OPDEFS[func._schema.name]._backward_fn is not None
            names = [a.name for a in func._schema.arguments]
            if "save_carries" in names and not args[names.index("save_carries")]:
                differentiable = False  # an inference forward: no backward
            args = [a.requires_grad_(True) if differentiable and isinstance(a, torch.Tensor) and a.is_floating_point()
                    else a for a in args]
            torch.library.opcheck(func, tuple(args), kwargs)
