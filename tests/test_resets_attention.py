"""Document masking in attention (`q_start`): packed documents in one row each see only themselves.

The reference in float64 against each document run alone (outputs and gradients of q, k, v and the
prefix), with a window, grouped-query heads, a prefix or cache holding keys of an earlier document
(masked) and of the same document (visible), and decoding across a boundary; then the Triton kernels
(forward, dQ, dK/dV, decode, prefill over a positional cache; on CPUs through TRITON_INTERPRET=1)
against the reference, with small tiles so that boundaries fall inside and at the edges of blocks;
opcheck of the custom ops with q_start; q_start=None as before.

Tolerances follow flash-attention's rule, as in test_triton_attention.py: the kernel's error against
float64 may be a small multiple of the error of the reference computed in the kernel's own dtype.
"""

import pytest
import torch

from samba_lm import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64


def document_starts(q_pos, boundaries, carried=None):
    """q_start for rows of q_pos [B, T]: a document begins at each chunk index of boundaries[r]; before
    the first, the row's document began at carried[r] (default: the row's first position, at least 0)."""
    q_start = torch.empty_like(q_pos)
    for r, cuts in enumerate(boundaries):
        start = carried[r] if carried is not None else max(int(q_pos[r, 0]), 0)
        for t in range(q_pos.shape[1]):
            start = int(q_pos[r, t]) if t in cuts else start
            q_start[r, t] = start
    return q_start


def packed(batch, T, H, Hkv, Dh, boundaries, P=0, carried=None, first=None, seed=0):
    """float64 inputs of `ops.attention` with q_start: rows starting at position first[r] (default P),
    and with P > 0 a prefix holding the P positions before the chunk in ring order, one slot empty."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    first = torch.full((batch, 1), P) if first is None else torch.tensor(first)[:, None]
    args = dict(q=r(batch, T, H, Dh), k=r(batch, T, Hkv, Dh), v=r(batch, T, Hkv, Dh), q_pos=first + torch.arange(T))
    if P:
        ring = (torch.arange(P) + 3) % P + first - P
        ring[:, 1] = -1
        args.update(k_prefix=r(batch, P, Hkv, Dh), v_prefix=r(batch, P, Hkv, Dh), prefix_pos=ring)
    args["q_start"] = document_starts(args["q_pos"], boundaries, carried)
    return args


def leaves(args, device=DEVICE, dtype=F64):
    """Copies of args on device: float tensors in dtype and requiring grad, the others as they are."""
    return {k: v.detach().to(device, dtype).requires_grad_(True) if v.is_floating_point() else v.to(device)
            for k, v in args.items()}


def grads(args):
    return {k: v.grad.double().cpu() for k, v in args.items() if v.is_floating_point()}


def documents(q_pos, q_start):
    """(row, a, b, start) for each document: the runs [a, b) of real queries (q_pos >= 0) with one q_start."""
    runs = []
    for r in range(q_pos.shape[0]):
        t, T = 0, q_pos.shape[1]
        while t < T:
            if q_pos[r, t] < 0:
                t += 1
                continue
            b = t
            while b < T and q_start[r, b] == q_start[r, t]:
                b += 1
            runs.append((r, t, b, int(q_start[r, t])))
            t = b
    return runs


def run_alone(args, window, grad_out):
    """Each document of the packed rows alone, through the reference without q_start, at positions
    counted from the document's start, with only its own prefix slots: outputs in the packed layout
    (zeros for padding) and gradients of the packed tensors (zeros where nothing sees them)."""
    x = leaves(args, "cpu")
    out = torch.zeros_like(x["q"])
    loss = 0
    for r, a, b, s in documents(x["q_pos"], x["q_start"]):
        rows = slice(r, r + 1)
        prefix = {}
        if "prefix_pos" in x:
            mine = x["prefix_pos"][r] >= s  # the document's own earlier keys (empty slots are negative)
            if mine.any():
                prefix = dict(k_prefix=x["k_prefix"][rows, mine], v_prefix=x["v_prefix"][rows, mine],
                              prefix_pos=x["prefix_pos"][rows, mine] - s)
        o = ops.attention_reference(x["q"][rows, a:b], x["k"][rows, a:b], x["v"][rows, a:b],
                                    x["q_pos"][rows, a:b] - s, window, **prefix)
        out[r, a:b] = o[0].detach()
        loss = loss + (o * grad_out[rows, a:b]).sum()
    loss.backward()
    return out, grads(x)


def run(fn, args, window, grad_out, dtype=F64):
    """fn(**args) with args in dtype on the device: output and gradients, in float64 on the CPU."""
    x = leaves(args, dtype=dtype)
    out = fn(**x, window=window)
    (out.double() * grad_out.to(out.device)).sum().backward()
    return out.double().cpu(), grads(x)


def random_like(q, seed):
    return torch.randn(*q.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ------------------------------------------------------------------ the reference: each document alone

@pytest.mark.parametrize("T, window, H, Hkv, boundaries, P, carried", [
    (20, 0, 2, 2, [[5, 12], [1, 2, 19]], 0, None),          # full causal; one-token documents, one at the end
    (24, 4, 4, 2, [[3, 10, 11], [8]], 0, None),              # a window shorter than the documents; GQA
    (18, 6, 2, 1, [[4, 9], [0, 13]], 7, [3, 0]),             # a prefix: earlier document (masked) and own keys
    (16, 0, 3, 1, [[6], []], 9, [5, 9]),                     # full attention's cache; a row of one document
])
def test_reference_equals_each_document_alone(T, window, H, Hkv, boundaries, P, carried):
    args = packed(2, T, H, Hkv, 4, boundaries, P, carried, seed=T)
    grad_out = random_like(args["q"], 1)
    out, d = run(ops.attention_reference, args, window, grad_out)
    want, d_want = run_alone(args, window, grad_out)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for name in d_want:
        torch.testing.assert_close(d[name], d_want[name], rtol=1e-12, atol=1e-12, msg=name)
    if P:  # the earlier document's cached keys get no gradient
        earlier = (args["prefix_pos"] >= 0) & (args["prefix_pos"] < args["q_start"].min(1, keepdim=True).values)
        assert earlier.any() and (d["k_prefix"][earlier] == 0).all() and (d["v_prefix"][earlier] == 0).all()


def stream(args, window, chunks, slots, dtype=F64, grad=False):
    """Rows streamed through `ops.attention_with_cache` in chunks [a, b) (a one-token chunk is a decode
    step), with a positional cache of `slots` slots: the outputs, concatenated."""
    x = {k: v.to(DEVICE, dtype).requires_grad_(grad) if v.is_floating_point() else v.to(DEVICE)
         for k, v in args.items()}
    batch, _, Hkv, Dh = x["k"].shape
    k_cache = torch.zeros(batch, slots, Hkv, Dh, device=DEVICE, dtype=dtype)
    v_cache, cache_pos = k_cache.clone(), torch.full((batch, slots), -1, device=DEVICE)
    outs = []
    with torch.set_grad_enabled(grad):
        for a, b in chunks:
            part = [x[name][:, a:b] for name in ("q", "k", "v", "q_pos")]
            outs.append(ops.attention_with_cache(*part, window, k_cache, v_cache, cache_pos,
                                                 q_start=x["q_start"][:, a:b]))
    return torch.cat(outs, 1).detach().double().cpu()


# Chunks with a document boundary inside a chunk, at a chunk's edge, and in token-by-token decoding.
STREAM_CHUNKS = [(0, 5), (5, 12), (12, 13), (13, 14), (14, 15), (15, 22), (22, 23), (23, 24), (24, 25), (25, 30)]
STREAM_BOUNDARIES = [[9, 14, 24], [12, 23]]


@pytest.mark.parametrize("window, slots", [(6, 5), (0, 32)])
def test_reference_streamed_through_a_cache_equals_each_document_alone(window, slots):
    """SWA's ring (window - 1 slots) and full attention's cache hold keys of the earlier document when
    the next begins: streamed in chunks and decode steps, each document still sees only itself."""
    args = packed(2, 30, 4, 2, 8, STREAM_BOUNDARIES, first=[0, 0], seed=3)
    want, _ = run_alone(args, window, torch.zeros_like(args["q"]))
    with ops.use_kernels("reference"):
        torch.testing.assert_close(stream(args, window, STREAM_CHUNKS, slots), want, rtol=1e-12, atol=1e-12)


def test_q_start_none_and_a_single_document_agree():
    """q_start=None is one document per row; so is q_start = 0 everywhere (rows from position 0)."""
    args = packed(2, 13, 2, 1, 4, [[], []], P=0)
    grad_out = random_like(args["q"], 2)
    q_start = args.pop("q_start")
    out, d = run(ops.attention_reference, args, 5, grad_out)
    out_0, d_0 = run(ops.attention_reference, dict(args, q_start=q_start), 5, grad_out)
    assert (q_start == 0).all() and torch.equal(out, out_0) and all(torch.equal(d[k], d_0[k]) for k in d)


@pytest.mark.parametrize("change, message", [
    (dict(q_start=torch.zeros(2, 6, dtype=torch.int32)), "q_start must be an int64"),
    (dict(q_start=torch.zeros(2, 5, dtype=torch.int64)), "q_start has shape"),
    (dict(q_start=torch.full((2, 6), 4, dtype=torch.int64)), "q_start must be <= q_pos"),
])
def test_q_start_errors_name_the_argument(change, message):
    args = packed(2, 6, 2, 1, 4, [[], []], P=3)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        ops.attention(**args, window=4)
    cache = (args["k_prefix"], args["v_prefix"], args["prefix_pos"])
    with pytest.raises(ValueError, match=message):
        ops.attention_with_cache(args["q"], args["k"], args["v"], args["q_pos"], 4, *cache, q_start=args["q_start"])


def test_padding_queries_are_not_checked():
    """Left padding (negative positions) sees nothing whatever its q_start: only real queries must have
    q_start <= q_pos."""
    args = packed(1, 6, 2, 1, 4, [[]], first=[-2])
    args["q_start"][0, :2] = 3
    out = ops.attention(**args, window=0)
    assert (out[0, :2] == 0).all()


# ------------------------------------------------------------------ the Triton kernels against the reference

triton = pytest.importorskip("triton", reason="Triton kernels need the `triton` package (pip install triton)")
from samba_lm.ops.triton_attention_decode import attention_decode  # noqa: E402


def tiles_everywhere(tiles) -> dict:
    table = {d: tiles for d in (16, 32, 64, 128, 256)}
    return dict(fwd_tiles=table, dq_tiles=table, dkdv_tiles=table, fp32_tiles=tiles)


@pytest.fixture(autouse=True)
def small_tiles():
    """Blocks of 16 queries and keys on CPUs, so that a short row spans many blocks."""
    with ops.tuned(attention=tiles_everywhere((16, 16, 4, 1)) if DEVICE == "cpu" else {}):
        yield


def rel_err(a, ref):
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_within(name, tri, ref, exact, dtype):
    slack = 1e-5 if dtype == torch.float32 else 1e-3
    assert torch.isfinite(tri).all(), name
    if exact.abs().max() == 0:
        assert tri.abs().max() < 1e-4, name
    else:
        assert rel_err(tri, exact) <= 3 * rel_err(ref, exact) + slack, name


def check(args, window, dtype):
    """Triton against float64 (within 3x the error of the reference in dtype): output and gradients."""
    grad_out = random_like(args["q"], 7)
    o64, d64 = run(ops.attention_reference, args, window, grad_out)
    with ops.use_kernels("reference"):
        o_ref, d_ref = run(ops.attention, args, window, grad_out, dtype)
    with ops.use_kernels("triton"):
        o_tri, d_tri = run(ops.attention, args, window, grad_out, dtype)
    for name, tri, ref, ex in [("out", o_tri, o_ref, o64)] + [(f"d{k}", d_tri[k], d_ref[k], d64[k]) for k in d64]:
        assert_within(name, tri, ref, ex, dtype)


@pytest.mark.parametrize("T, window, H, Hkv, boundaries, dtype", [
    (45, 0, 2, 1, [[7, 16, 17, 40], [37]], torch.float32),   # inside blocks, at their edges, one-token documents
    (70, 0, 2, 1, [[20], [32, 33]], torch.float32),           # documents over several blocks: unmasked blocks
    (50, 9, 4, 2, [[5, 23, 48], [16, 30]], torch.float32),   # a window inside documents; GQA 2
    (40, 24, 2, 2, [[3, 20], [10, 11, 12]], torch.bfloat16),  # window and documents both cut
    (37, 1, 2, 1, [[4, 20], []], torch.float16),              # each query sees only itself
])
def test_triton_documents_in_a_chunk(T, window, H, Hkv, boundaries, dtype):
    check(packed(2, T, H, Hkv, 16, boundaries, seed=T), window, dtype)


@pytest.mark.parametrize("T, P, window, boundaries, carried, dtype", [
    (20, 9, 10, [[6], [0, 13]], [5, 0], torch.float32),       # the earlier document in part of the ring
    (40, 24, 0, [[3, 30], [17]], [10, 24], torch.float32),    # full attention: most of the cache masked
    (5, 15, 16, [[2], []], [7, 14], torch.bfloat16),          # a short chunk; a document begun at the ring's end
])
def test_triton_documents_over_a_prefix(T, P, window, boundaries, carried, dtype):
    """Chunked prefill: the chunk's first document began in the prefix (its keys there are visible,
    the earlier document's are not); gradients reach the prefix."""
    check(packed(2, T, 2, 1, 16, boundaries, P, carried, seed=P), window, dtype)


def test_triton_documents_after_left_padding():
    """Rows that start with padding (negative positions; q_start 0 there), then documents."""
    check(packed(2, 40, 2, 1, 16, [[9, 20], [25]], first=[-5, -21], seed=1), 8, torch.float32)


@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)])
def test_triton_documents_with_query_and_key_blocks_of_different_sizes(tiles):
    args = packed(2, 45, 2, 1, 16, [[8, 31], [16, 33]], 13, [4, 13], seed=3)
    with ops.tuned(attention=tiles_everywhere((*tiles, 4, 1))):
        check(args, 20, torch.float32)


@pytest.mark.parametrize("window", [0, 11])
def test_triton_any_q_start(window):
    """q_start need not come from contiguous documents: any start <= q_pos, in any order, masks the
    same in the kernels (block skipping reads the starts, it does not assume their order)."""
    args = packed(2, 48, 2, 1, 16, [[], []], P=6, seed=5)
    g = torch.Generator().manual_seed(6)
    args["q_start"] = (torch.rand(2, 48, generator=g) * (args["q_pos"] + 1)).long()
    check(args, window, torch.float32)


def test_triton_q_start_zero_is_none():
    """One document from position 0 takes the document path and gives bit for bit what None gives."""
    args = packed(2, 45, 2, 1, 16, [[], []], seed=8)
    grad_out = random_like(args["q"], 3)
    q_start = args.pop("q_start")
    with ops.use_kernels("triton"):
        out, d = run(ops.attention, args, 9, grad_out, torch.float32)
        out_0, d_0 = run(ops.attention, dict(args, q_start=q_start), 9, grad_out, torch.float32)
    assert torch.equal(out, out_0) and all(torch.equal(d[k], d_0[k]) for k in d)


@pytest.mark.parametrize("window, slots, dtype", [(6, 5, torch.float32), (0, 32, torch.bfloat16)])
def test_triton_streamed_through_a_cache(window, slots, dtype):
    """Prefill over a positional cache and decode steps (the kernels `attention_with_cache` takes
    without gradients), then with gradients (the general kernels over a snapshot), across boundaries."""
    args = packed(2, 30, 4, 2, 16, STREAM_BOUNDARIES, first=[0, 0], seed=4)
    exact, _ = run_alone(args, window, torch.zeros_like(args["q"]))
    with ops.use_kernels("reference"):
        ref = stream(args, window, STREAM_CHUNKS, slots, dtype)
    with ops.use_kernels("triton"):
        for grad in (False, True):
            assert_within(f"grad={grad}", stream(args, window, STREAM_CHUNKS, slots, dtype, grad), ref, exact, dtype)


# Decode tilings (see test_triton_attention_decode.py): one split of tiles, splits of two tiles, of one.
DECODE_TILINGS = [dict(keys_per_tile=16, min_split_blocks=10**6),
                  dict(keys_per_tile=16, min_split_blocks=2, programs_per_sm=10**6),
                  dict(keys_per_tile=16, min_split_blocks=1, programs_per_sm=10**6)]


@pytest.mark.parametrize("tiling", DECODE_TILINGS)
@pytest.mark.parametrize("window", [0, 40])
def test_triton_decode_over_a_cache_across_a_boundary(tiling, window):
    """One query per row over a ring of 50 earlier positions (one empty), its document begun inside
    the ring (row 0), at its own token (row 1: it sees only itself), before the ring (row 2)."""
    args = packed(3, 1, 8, 2, 64, [[], [0], []], P=50, carried=[31, 50, 0], first=[50, 50, 50], seed=9)
    args["q"] = args["q"] * 2
    exact = ops.attention_reference(**args, window=window)
    with ops.tuned(attention_decode=tiling):
        for dtype in (torch.float32, torch.bfloat16):
            low = {k: v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE) for k, v in args.items()}
            ref = ops.attention_reference(**low, window=window).double().cpu()
            out = attention_decode(**low, window=window).double().cpu()
            assert_within(str(dtype), out, ref, exact, dtype)
            torch.testing.assert_close(out[1], args["v"][1].repeat_interleave(4, 1).to(dtype).double(), rtol=0, atol=0)
            with ops.use_kernels("triton"), torch.no_grad():  # the public op's decode path
                assert torch.equal(ops.attention(**low, window=window).double().cpu(), out)


def test_triton_a_query_before_its_document_sees_nothing():
    """Against the rule q_start <= q_pos (checked on CPUs only), a query whose document begins after
    it sees no key, not even its own, and returns zeros, as in the reference: the kernels (called
    past the check) agree, in a chunk and in a decode step."""
    from samba_lm.ops.triton_attention import attention_triton

    args = packed(2, 20, 2, 1, 16, [[], []], P=4, seed=11)
    args["q_start"][0, 9] = args["q_pos"][0, 9] + 1
    args["q_start"][1, 0] = args["q_pos"][1, 0] + 5
    low = leaves(args, dtype=torch.float32)
    with torch.no_grad():
        for sl in (slice(None), slice(0, 1)):
            chunk = {k: v[:, sl] if k in ("q", "k", "v", "q_pos", "q_start") else v for k, v in low.items()}
            out = attention_triton(**chunk, window=0).cpu()
            torch.testing.assert_close(out, ops.attention_reference(**chunk, window=0).cpu(), rtol=1e-5, atol=1e-5)
            assert (out[1, 0] == 0).all() and (sl.stop == 1 or (out[0, 9] == 0).all())


def test_decode_q_start_errors():
    args = {k: v.float() if v.is_floating_point() else v for k, v in packed(2, 1, 4, 2, 64, [[], []], P=5).items()}
    for bad in (args["q_start"].int(), args["q_start"][:1]):
        with pytest.raises(ValueError, match="q_start must be"):
            attention_decode(**{**args, "q_start": bad}, window=0)


# ------------------------------------------------------------------ the custom ops

def attention_ops_with_documents():
    """Training over a prefix, decode over a prefix, prefill and decode over a positional cache, each
    with q_start: every attention custom op."""
    args = {k: v.to(DEVICE, torch.float32) if v.is_floating_point() else v.to(DEVICE)
            for k, v in packed(2, 12, 2, 1, 16, [[5], [9]], P=6, carried=[3, 6], seed=2).items()}
    ops.attention(**{k: v.requires_grad_(v.is_floating_point()) for k, v in args.items()}, window=8).sum().backward()
    args = {k: v.detach() for k, v in args.items()}
    with torch.no_grad():
        step = {k: args[k][:, :1] for k in ("q", "k", "v", "q_pos", "q_start")}
        ops.attention(**step, window=8, k_prefix=args["k_prefix"], v_prefix=args["v_prefix"],
                      prefix_pos=args["prefix_pos"])
        cache = [torch.zeros(2, 8, 1, 16, device=DEVICE), torch.zeros(2, 8, 1, 16, device=DEVICE),
                 torch.full((2, 8), -1, device=DEVICE)]
        for a, b in [(0, 11), (11, 12)]:
            ops.attention_with_cache(*(args[k][:, a:b] for k in ("q", "k", "v", "q_pos")), 8, *cache,
                                     q_start=args["q_start"][:, a:b])


def test_opcheck_with_q_start():
    from test_opcheck import recorded

    calls = recorded(attention_ops_with_documents)
    names = {func._schema.name for func, _, _ in calls}
    assert names == {f"samba_lm::attention_{op}" for op in ("fwd", "bwd", "decode", "prefill_cached",
                                                            "decode_cached")}, names
    for func, args, kwargs in calls:
        names = [a.name for a in func._schema.arguments]
        assert args[names.index("q_start")] is not None, func
        differentiable = torch._library.custom_ops.OPDEFS[func._schema.name]._backward_fn is not None
        args = [a.requires_grad_(True) if differentiable and isinstance(a, torch.Tensor) and a.is_floating_point()
                else a for a in args]
        torch.library.opcheck(func, tuple(args), kwargs)
