"""The Triton sliding-window attention against the float64 reference (on CPUs through
TRITON_INTERPRET=1, on GPUs natively): values and gradients, exact window edges, a prefix in ring
order, left padding, grouped-query heads, odd lengths.

Tolerances follow flash-attention's rule: the kernel's error against float64 may be a small multiple
of the error of the reference computed in the kernel's own dtype.
"""

import pytest
import torch

from samba_lm import ops

triton = pytest.importorskip("triton", reason="Triton kernels need the `triton` package (pip install triton)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiles_everywhere(tiles) -> dict:
    """The attention tuning with one (BLOCK_M, BLOCK_N, warps, stages) for every kernel and head dim."""
    table = {d: tiles for d in (16, 32, 64, 128, 256)}
    return dict(fwd_tiles=table, dq_tiles=table, dkdv_tiles=table, fp32_tiles=tiles)


@pytest.fixture(autouse=True)
def small_tiles():
    """Small blocks on CPUs (the interpreter is slow), so that a short sequence still spans many
    blocks and every masked/unmasked range is exercised."""
    with ops.tuned(attention=tiles_everywhere((16, 16, 4, 1)) if DEVICE == "cpu" else {}):
        yield


def inputs(batch, T, H, Hkv, Dh, P, dtype, seed, start=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    start = torch.full((batch, 1), P, dtype=torch.long) if start is None else start
    exact = dict(q=r(batch, T, H, Dh), k=r(batch, T, Hkv, Dh), v=r(batch, T, Hkv, Dh),
                 q_pos=start + torch.arange(T))
    if P:  # a ring of the P positions before the chunk, rotated, with one empty slot
        ring = (torch.arange(P) + 3) % P + start - P
        ring[:, 1] = -1
        exact.update(k_prefix=r(batch, P, Hkv, Dh), v_prefix=r(batch, P, Hkv, Dh), prefix_pos=ring)
    low = {k: v.to(DEVICE, dtype if v.is_floating_point() else v.dtype) for k, v in exact.items()}
    return exact, low


def run(fn, args, window, grad_out):
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in args.items()}
    out = fn(**leaves, window=window)
    (out.double() * grad_out.to(out.device)).sum().backward()
    return out.double().cpu(), {k: v.grad.double().cpu() for k, v in leaves.items() if v.is_floating_point()}


def rel_err(a, ref):
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(exact, low, window, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(*exact["q"].shape, generator=g, dtype=torch.float64)
    o64, d64 = run(ops.attention_reference, exact, window, grad_out)
    with ops.use_kernels("reference"):
        o_ref, d_ref = run(ops.attention, low, window, grad_out)
    with ops.use_kernels("triton"):
        o_tri, d_tri = run(ops.attention, low, window, grad_out)
    slack = 1e-5 if dtype == torch.float32 else 1e-3
    for name, tri, ref, ex in [("out", o_tri, o_ref, o64)] + [(f"d{k}", d_tri[k], d_ref[k], d64[k]) for k in d64]:
        assert torch.isfinite(tri).all(), name
        if ex.abs().max() == 0:  # e.g. dq when each query sees one key: only rounding is left
            assert tri.abs().max() < 1e-4, name
        else:
            assert rel_err(tri, ex) <= 3 * rel_err(ref, ex) + slack, name


@pytest.mark.parametrize("T, window, H, Hkv, Dh, dtype", [
    (45, 7, 2, 1, 16, torch.float32),     # window edges inside blocks, GQA 2
    (64, 16, 4, 1, 32, torch.bfloat16),   # window a multiple of the block: unmasked middle blocks
    (50, 0, 2, 2, 16, torch.float16),     # full causal attention
    (37, 100, 2, 1, 16, torch.float32),   # window longer than the sequence
    (33, 1, 2, 1, 16, torch.float32),     # each query sees only itself
])
def test_attention_values_and_gradients(T, window, H, Hkv, Dh, dtype):
    exact, low = inputs(2, T, H, Hkv, Dh, 0, dtype, seed=T)
    check(exact, low, window, dtype)


@pytest.mark.parametrize("Dh, H, Hkv, dtype", [(64, 4, 1, torch.bfloat16), (128, 4, 2, torch.float16),
                                              (256, 2, 1, torch.bfloat16)])
def test_attention_at_the_model_head_dims(Dh, H, Hkv, dtype):
    """The presets' head dims (64, 128, 256) with a prefix, a window edge inside blocks and a length
    that is not a multiple of any block: on a GPU with the shipped tiles, which the cases above (head
    dims 16 and 32) do not use."""
    T, P = 150 if DEVICE == "cuda" else 40, 29
    exact, low = inputs(1, T, H, Hkv, Dh, P, dtype, seed=Dh)
    check(exact, low, 37, dtype)


@pytest.mark.parametrize("T, P, window, dtype", [(20, 9, 10, torch.float32), (5, 31, 32, torch.bfloat16),
                                                 (40, 24, 0, torch.float32)])
def test_attention_with_prefix_in_ring_order(T, P, window, dtype):
    """Chunked prefill: a chunk after a ring of cached keys (any order, an empty slot); gradients
    reach the prefix too."""
    exact, low = inputs(2, T, 2, 1, 16, P, dtype, seed=P)
    check(exact, low, window, dtype)


def test_attention_left_padding_rows_are_zero():
    """Rows starting at a negative position (left padding): padded queries see nothing, return 0,
    and nobody sees padded keys."""
    start = torch.tensor([[-5], [-21]])
    exact, low = inputs(2, 40, 2, 1, 16, 0, torch.float32, seed=1, start=start)
    check(exact, low, 8, torch.float32)
    with ops.use_kernels("triton"):
        out = ops.attention(**low, window=8)
    assert torch.all(out[0, :5] == 0) and torch.all(out[1, :21] == 0)


def test_attention_equals_full_causal_when_the_window_covers_everything():
    _, low = inputs(1, 48, 2, 1, 16, 0, torch.float32, seed=5)
    with ops.use_kernels("triton"):
        torch.testing.assert_close(ops.attention(**low, window=48), ops.attention(**low, window=0))


def test_attention_chunked_equals_whole():
    """Prefill in chunks through the ring (what the layer does) equals one pass."""
    _, low = inputs(1, 30, 2, 1, 16, 0, torch.float32, seed=9)
    W = 8
    with ops.use_kernels("triton"):
        whole = ops.attention(**low, window=W)
        ring_k = torch.zeros(1, W - 1, 1, 16, device=DEVICE)
        ring_v, ring_pos = ring_k.clone(), torch.full((1, W - 1), -1, device=DEVICE)
        outs = []
        for a, b in [(0, 3), (3, 17), (17, 18), (18, 30)]:
            chunk = {k: v[:, a:b] for k, v in low.items()}
            outs.append(ops.attention(**chunk, window=W, k_prefix=ring_k, v_prefix=ring_v, prefix_pos=ring_pos))
            newest = {k: v[0, -(W - 1):] for k, v in chunk.items()}  # as RingKV.append: no slot written twice
            slots = newest["q_pos"] % (W - 1)
            ring_k, ring_v, ring_pos = ring_k.clone(), ring_v.clone(), ring_pos.clone()
            ring_k[0, slots], ring_v[0, slots], ring_pos[0, slots] = newest["k"], newest["v"], newest["q_pos"]
    torch.testing.assert_close(torch.cat(outs, 1), whole)


def test_attention_empty_prefix_is_no_prefix():
    """Full attention's first call passes an empty cache: same values, and gradients for the chunk."""
    _, low = inputs(1, 20, 2, 1, 16, 0, torch.float32, seed=4)
    empty = dict(k_prefix=low["k"][:, :0], v_prefix=low["v"][:, :0], prefix_pos=low["q_pos"][:, :0])
    with ops.use_kernels("triton"):
        q = low["q"].clone().requires_grad_(True)
        out = ops.attention(**{**low, "q": q}, window=0, **empty)
        out.sum().backward()
        torch.testing.assert_close(out, ops.attention(**low, window=0))
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)])
def test_attention_with_query_and_key_blocks_of_different_sizes(tiles):
    """Tables may pair query and key blocks of different sizes (dK/dV at head dim 64: 128 x 64)."""
    exact, low = inputs(2, 45, 2, 1, 16, 13, torch.float32, seed=3, start=torch.tensor([[13], [10]]))
    with ops.tuned(attention=tiles_everywhere((*tiles, 4, 1))):
        check(exact, low, 20, torch.float32)


def test_attention_takes_strided_views():
    """q, k, v as views of one fused projection (the kernels address them in place) and as views
    that a tensor descriptor can't address (copied first) give the contiguous inputs' result."""
    _, low = inputs(2, 24, 2, 1, 16, 0, torch.float32, seed=6)
    q, k, v = low["q"], low["k"], low["v"]
    fused = torch.cat([q, k, v], dim=2)  # [B, T, H + 2 Hkv, Dh]
    odd = torch.zeros(*q.shape[:-1], 17, device=DEVICE)  # rows of 17 floats: not 16-byte aligned
    odd[..., 1:] = q
    with ops.use_kernels("triton"):
        want = ops.attention(q, k, v, low["q_pos"], window=8)
        got_fused = ops.attention(fused[:, :, :2], fused[:, :, 2:3], fused[:, :, 3:], low["q_pos"], window=8)
        got_odd = ops.attention(odd[..., 1:], k, v, low["q_pos"], window=8)
    torch.testing.assert_close(got_fused, want, rtol=0, atol=0)
    torch.testing.assert_close(got_odd, want, rtol=0, atol=0)
