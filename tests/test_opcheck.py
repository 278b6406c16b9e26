"""Every samba_lm custom op through `torch.library.opcheck` (schema, fake implementation against the
launcher's real outputs, autograd registration, AOT dispatch), with the arguments the public ops
really pass: each scenario runs a public op under the Triton backend (on CPUs through
TRITON_INTERPRET=1), records every samba_lm op it calls, and checks each recorded call. A fake that
disagrees with its launcher (the crash torch.compile met on samba-421m) fails here."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from samba_lm import ops

triton = pytest.importorskip("triton", reason="Triton kernels need the `triton` package (pip install triton)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32 = torch.float32


class Record(TorchDispatchMode):
    """Every samba_lm op called inside, with copies of its arguments as they were at the call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "samba_lm":
            copy = lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a  # noqa: E731
            self.calls.append((func, [copy(a) for a in args], {k: copy(v) for k, v in (kwargs or {}).items()}))
        return func(*args, **(kwargs or {}))


def recorded(fn) -> list:
    with ops.use_kernels("triton"), Record() as rec:
        fn()
    return rec.calls


def r(*shape, dtype=F32, grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


def scan_args(batch, T, E, N, grad, h0=True):
    return dict(u=r(batch, T, E, grad=grad), delta=r(batch, T, E, grad=grad) - 1,
                A=(-torch.rand(E, N, device=DEVICE) * 3).requires_grad_(grad), B=r(batch, T, N, grad=grad),
                C=r(batch, T, N, grad=grad), D=r(E, grad=grad), z=r(batch, T, E, grad=grad),
                delta_bias=(r(E) * 0.1).requires_grad_(grad),
                initial_state=r(batch, E, N, grad=grad) if h0 else None)


def scan_train():
    y, h = ops.selective_scan(**scan_args(2, 9, 24, 4, grad=True))
    (y.sum() + h.sum()).backward()


def scan_step_at_a_time_train():
    from samba_lm.ops import triton_scan, tuning

    assert triton_scan._sequential(tuning.current("scan"), 2, 40, torch.device(DEVICE)) or DEVICE == "cuda"
    y, h = ops.selective_scan(**scan_args(2, 9, 24, 4, grad=True))
    (y.sum() + h.sum()).backward()


def scan_segments_train():
    y, h = ops.selective_scan(**scan_args(1, 16, 8, 4, grad=True))  # two segments of 8 steps
    (y.sum() + h.sum()).backward()


def scan_inference_segments():
    with torch.no_grad():
        ops.selective_scan(**scan_args(1, 37, 40, 4, grad=False))


def scan_decode():
    with torch.no_grad():
        ops.selective_scan(**scan_args(3, 1, 40, 4, grad=False))


def conv_train_and_step():
    x, w, b = r(2, 19, 24, grad=True), r(24, 4, grad=True), r(24, grad=True)
    y, s = ops.causal_conv1d(x, w, b, r(2, 24, 3))
    (y.sum() + s.sum()).backward()
    with torch.no_grad():
        ops.causal_conv1d(r(2, 1, 24), w.detach(), b.detach(), r(2, 24, 3))


def conv_train():
    x, w, b = r(2, 5, 8, grad=True), r(8, 4, grad=True), r(8, grad=True)
    y, s = ops.causal_conv1d(x, w, b, r(2, 8, 3))
    (y.sum() + s.sum()).backward()


def attention_train():
    q, k, v = r(2, 19, 4, 16, grad=True), r(2, 19, 2, 16, grad=True), r(2, 19, 2, 16, grad=True)
    pos = torch.arange(19, device=DEVICE).expand(2, 19)
    ops.attention(q, k, v, pos, 8).sum().backward()


def attention_with_caches():
    """A positional cache as the state keeps it: a prefill chunk, then one decode step, each storing
    itself in the cache."""
    with torch.no_grad():
        k_cache, v_cache = r(2, 8, 2, 16), r(2, 8, 2, 16)
        cache_pos = torch.full((2, 8), -1, device=DEVICE, dtype=torch.long)
        pos = torch.arange(5, device=DEVICE).expand(2, 5).contiguous()
        ops.attention_with_cache(r(2, 5, 4, 16), r(2, 5, 2, 16), r(2, 5, 2, 16), pos, 8, k_cache, v_cache, cache_pos)
        ops.attention_with_cache(r(2, 1, 4, 16), r(2, 1, 2, 16), r(2, 1, 2, 16), pos[:, -1:] + 1, 8,
                                 k_cache, v_cache, cache_pos)
        # a cross layer's reads of a cache that holds its chunk already: prefill and decode, no append
        ops.attention_with_cache(r(2, 2, 4, 16), r(2, 2, 2, 16), r(2, 2, 2, 16), pos[:, -2:], 0,
                                 k_cache, v_cache, cache_pos, append=False)
        ops.attention_with_cache(r(2, 1, 4, 16), r(2, 1, 2, 16), r(2, 1, 2, 16), pos[:, -1:] + 1, 0,
                                 k_cache, v_cache, cache_pos, append=False)
        # differential (half-width) queries, which the decode kernels read as they are
        ops.attention_with_cache(r(2, 1, 4, 8), r(2, 1, 2, 16), r(2, 1, 2, 16), pos[:, -1:] + 1, 0,
                                 k_cache, v_cache, cache_pos, append=False)


def attention_decode_over_prefix():
    with torch.no_grad():
        k, v = r(2, 9, 2, 16), r(2, 9, 2, 16)
        prefix_pos = torch.arange(9, device=DEVICE).expand(2, 9).contiguous()
        ops.attention(r(2, 1, 4, 16), r(2, 1, 2, 16), r(2, 1, 2, 16), prefix_pos[:, -1:] + 1, 8, k, v, prefix_pos)
        ops.attention(r(2, 3, 4, 16), r(2, 3, 2, 16), r(2, 3, 2, 16), prefix_pos[:, -3:] + 3, 8, k, v, prefix_pos)


def rope_train():
    qkv = r(2, 5, (4 + 2 * 2) * 16, grad=True)
    sum(o.sum() for o in ops.qkv_rope(qkv, torch.arange(5, device=DEVICE).expand(2, 5), 4, 2, 10000.0)).backward()


def norm_and_swiglu_train():
    h, d, w = r(2, 3, 32, grad=True), r(2, 3, 32, grad=True), r(32, grad=True)
    s, y = ops.add_rmsnorm(h, d, w, 1e-5)
    _, y16 = ops.add_rmsnorm(h, d, w, 1e-5, torch.bfloat16)  # y in autocast's dtype
    (s.sum() + y.sum() + y16.float().sum() + ops.swiglu(r(2, 3, 48, grad=True)).sum()).backward()


def mamba_decode_step():
    from test_triton_decode_step import mamba_args

    g = torch.Generator().manual_seed(0)
    args = {k: v.to(DEVICE, F32) if v.is_floating_point() else v.to(DEVICE)
            for k, v in mamba_args(3, 24, 4, 4, 5, g).items()}
    with torch.no_grad():
        ops.mamba_inner(**args)


def mamba_inner_train():
    from test_triton_mamba_train import inputs

    args = inputs(F32)
    y, conv_state, ssm_state = ops.mamba_inner(args["xz"], None, *list(args.values())[1:])
    (y.sum() + conv_state.sum() + ssm_state.sum()).backward()


def rows_matmul():
    with torch.no_grad():
        ops.linear(r(3, 1, 64, dtype=torch.bfloat16), r(40, 64, dtype=torch.bfloat16))


def choose():
    batch = 3
    with torch.no_grad():
        ops.choose_tokens(r(batch, 97), torch.full((batch,), 0.8, device=DEVICE), torch.full((batch,), -1e9, device=DEVICE),
                          torch.arange(batch, device=DEVICE), torch.arange(batch, device=DEVICE) + 4,
                          torch.zeros(batch, device=DEVICE, dtype=torch.long),
                          torch.zeros(batch, device=DEVICE, dtype=torch.bool), torch.tensor([5], device=DEVICE))


def cross_entropy_train_and_eval():
    x, w, t = r(7, 16, grad=True), r(50, 16, grad=True), torch.randint(0, 50, (7,), device=DEVICE)
    t[2] = -100
    ops.linear_cross_entropy(x, w, t, chunk_tokens=3).backward()  # gradients in the forward
    ops.linear_cross_entropy(x, w, t, chunk_tokens=3, reduction="none").sum().backward()  # recomputed
    with torch.no_grad():
        ops.linear_cross_entropy(x, w, t, reduction="none")


def differential_mix_inference():
    with torch.no_grad():
        ops.differential_mix(r(2, 3, 4, 32), *(r(16) * 0.1 for _ in range(4)), 0.2, r(32), 1e-5)


def layernorm_inference():
    with torch.no_grad():
        ops.add_layernorm(r(2, 3, 32), r(2, 3, 32, dtype=torch.bfloat16), r(32), r(32), 1e-5)
        ops.add_layernorm(r(2, 3, 32), None, r(32), r(32), 1e-5)
        ops.add_layernorm(r(2, 3, 32), None, r(32), r(32), 1e-5, torch.bfloat16)


SCENARIOS = {
    "scan, chunked, training": scan_train,
    "scan, step at a time, training": scan_step_at_a_time_train,
    "scan, time segments, training": scan_segments_train,
    "scan, time segments, inference": scan_inference_segments,
    "scan, decode step": scan_decode,
    "conv, training and decode step": conv_train_and_step,
    "conv, two-pass backward, training": conv_train,
    "attention, training": attention_train,
    "attention, decode and prefill over a prefix": attention_decode_over_prefix,
    "rope, training": rope_train,
    "add_rmsnorm and swiglu, training": norm_and_swiglu_train,
    "mamba decode step": mamba_decode_step,
    "mamba mixer, training": mamba_inner_train,
    "attention over a positional cache": attention_with_caches,
    "rows matmul": rows_matmul,
    "choose tokens": choose,
    "linear cross-entropy, training and evaluation": cross_entropy_train_and_eval,
    "differential attention's mix, inference": differential_mix_inference,
    "add_layernorm, inference": layernorm_inference,
}
# The tuning that takes a scenario's path at interpreter sizes; its opchecks run under it too, as the
# launchers read it again.
TUNING = {
    "scan, step at a time, training": dict(scan=dict(sequential_min_programs_per_sm=1)),
    "scan, time segments, training": dict(scan=dict(sequential_min_segment=8, sequential_segment_programs_per_sm=10**6,
                                                    training_segment_below_programs_per_sm=10**6,
                                                    backward_segment_programs_per_sm=10**6)),
    "scan, time segments, inference": dict(scan=dict(sequential_min_segment=8,
                                                     sequential_segment_programs_per_sm=10**6)),
    "conv, two-pass backward, training": dict(conv=dict(fused_backward=False)),
    "mamba mixer, training": dict(scan=dict(sequential_min_programs_per_sm=1)),
    # On a GPU only tabled shapes take the few-rows kernel (the others go to cuBLAS): table this one, split in two.
    "rows matmul": dict(linear=dict(tiles={(16, 40, 64): (32, 64, 4, 1, 2)})),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_custom_op_a_scenario_calls_passes_opcheck(scenario):
    with ops.tuned(**TUNING.get(scenario, {})):
        calls = recorded(SCENARIOS[scenario])
        assert calls, "the scenario called no samba_lm op: it no longer reaches the Triton backend"
        for func, args, kwargs in calls:
            # Inputs that require grad where the op has a backward: opcheck then checks its registration too.
            differentiable = torch._library.custom_ops.OPDEFS[func._schema.name]._backward_fn is not None
            names = [a.name for a in func._schema.arguments]
            if "save_carries" in names and not args[names.index("save_carries")]:
                differentiable = False  # an inference forward: no carries saved, no backward (it raises)
            args = [a.requires_grad_(True) if differentiable and isinstance(a, torch.Tensor) and a.is_floating_point()
                    else a for a in args]
            torch.library.opcheck(func, tuple(args), kwargs)


def test_the_scenarios_cover_every_custom_op():
    """A new custom op needs a scenario here."""
    seen = set()
    for name, scenario in SCENARIOS.items():
        with ops.tuned(**TUNING.get(name, {})):
            seen |= {func._schema.name for func, _, _ in recorded(scenario)}
    registered = {f"samba_lm::{name}" for name in dir(torch.ops.samba_lm)
                  if isinstance(getattr(torch.ops.samba_lm, name), torch._ops.OpOverloadPacket)}
    missing = registered - seen
    assert not missing, f"custom ops no scenario calls: {sorted(missing)}"
