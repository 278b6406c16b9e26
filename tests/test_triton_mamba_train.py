"""The Mamba mixer's training op (`ops/triton_mamba_train.py`: one forward and one backward around the
conv and scan kernels, in_proj's gradient written in place) against float64: values, final states and
every gradient, on each of the scan's training paths, with and without document resets, in fp32 and
under bf16 autocast. On CPUs through TRITON_INTERPRET=1."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from samba_lm import ops

pytest.importorskip("triton", reason="Triton kernels need the `triton` package (pip install triton)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, T, E, N, R, K = 2, 37, 24, 4, 3, 4
PATHS = {  # tunings that take each of the scan's training paths (and the conv's) at these sizes
    "chunked": dict(scan=dict(sequential_backward=False)),
    "step at a time": dict(scan=dict(sequential_min_programs_per_sm=1)),
    "time segments": dict(scan=dict(sequential_min_segment=8, sequential_segment_programs_per_sm=10**6,
                                    training_segment_below_programs_per_sm=10**6,
                                    backward_segment_programs_per_sm=10**6)),
    "step at a time, two-pass conv backward": dict(scan=dict(sequential_min_programs_per_sm=1),
                                                   conv=dict(fused_backward=False)),
}


def inputs(dtype, bias=True):
    """The op's arguments as the model passes them: xz in the compute dtype, the parameters fp32."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    args = dict(xz=r(B, T, 2 * E), conv_weight=r(E, K, scale=0.5), conv_bias=r(E, scale=0.1) if bias else None,
                x_proj_weight=r(R + 2 * N, E, scale=0.3), dt_proj_weight=r(E, R, scale=0.5),
                dt_proj_bias=r(E, scale=0.1) - 2, A_log=torch.log(torch.arange(1.0, N + 1)).double().expand(E, N).clone(),
                D=1 + r(E, scale=0.1))
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return {k: None if v is None else v.to(DEVICE, dtype if k == "xz" else wide).requires_grad_(True)
            for k, v in args.items()}


def run(args, backend, reset, autocast):
    """Outputs and the gradients of a loss that reads y and both final states."""
    leaves = [v for v in args.values() if v is not None]
    ctx = torch.autocast(DEVICE, dtype=torch.bfloat16) if autocast else torch.autocast(DEVICE, enabled=False)
    with ops.use_kernels(backend), ctx:
        y, conv_state, ssm_state = ops.mamba_inner(args["xz"], None, *list(args.values())[1:], reset=reset)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(y.shape, generator=g, dtype=torch.float64).to(DEVICE)
    loss = (y.double() * w).sum() + (ssm_state.double() ** 2).sum() + conv_state.double().sum()
    return [y, conv_state, ssm_state, *torch.autograd.grad(loss, leaves)]


class Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("with_reset", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_training_op_against_float64(path, with_reset, dtype):
    reset = None
    if with_reset:
        reset = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
        reset[0, 11], reset[1, 30] = True, True
    autocast = dtype == torch.bfloat16
    with ops.tuned(**PATHS[path]):
        exact = run(inputs(torch.float64), "reference", reset, False)
        ref = run(inputs(dtype), "reference", reset, autocast)
        tri = run(inputs(dtype), "triton", reset, autocast)
    slack = 1e-6 if dtype == torch.float32 else 2e-3
    for i, (t, r, e) in enumerate(zip(tri, ref, exact)):
        err = lambda x: ((x.double() - e).norm() / e.norm()).item()  # noqa: E731
        assert t.dtype == r.dtype and t.shape == r.shape, i
        assert err(t) <= 3 * err(r) + slack, (i, err(t), err(r))


def test_training_calls_take_the_op_and_others_the_composition():
    """With gradients from fresh streams the op runs; with a state (streaming) or without gradients,
    the conv and scan ops composed."""
    args = inputs(torch.float32)
    params = list(args.values())[1:]
    for kwargs, grad, fused in [({}, True, True), (dict(ssm_state=torch.zeros(B, E, N, device=DEVICE)), True, False),
                                ({}, False, False)]:
        with ops.use_kernels("triton"), Calls() as calls, torch.set_grad_enabled(grad):
            ops.mamba_inner(args["xz"], None, *params, **kwargs)
        assert ("samba_lm.mamba_inner_fwd.default" in calls.names) == fused, (kwargs, grad)
        assert ("samba_lm.selective_scan_fwd.default" in calls.names) != fused, (kwargs, grad)


def test_without_conv_bias():
    with ops.tuned(**PATHS["step at a time"]):
        exact = run(inputs(torch.float64, bias=False), "reference", None, False)
        tri = run(inputs(torch.float32, bias=False), "triton", None, False)
    for t, e in zip(tri, exact):
        assert ((t.double() - e).norm() / e.norm()).item() < 1e-5
