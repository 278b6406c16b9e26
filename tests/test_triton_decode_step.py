"""The decode step's Triton kernels against the references (on CPUs through TRITON_INTERPRET=1): the
Mamba mixer's fused step, attention over a positional cache with the append, the token choice, and
the time-segmented scan of an inference forward with few rows."""

import pytest
import torch

from samba_lm import ops

triton = pytest.importorskip("triton", reason="Triton kernels need the `triton` package (pip install triton)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a, ref):
    return ((a.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm().clamp_min(1e-30)).item()


def mamba_args(batch, E, N, K, R, g):
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    positions = torch.tensor([5, -1, 0] * batch)[:batch, None]  # a row at -1: left padding
    return dict(xz=r(batch, 1, 2 * E), positions=positions, conv_weight=r(E, K),
                conv_bias=r(E), x_proj_weight=r(R + 2 * N, E) * 0.3, dt_proj_weight=r(E, R) * 0.3,
                dt_proj_bias=r(E) * 0.3 - 1, A_log=torch.rand(E, N, generator=g, dtype=torch.float64),
                D=r(E), conv_state=r(batch, E, K - 1), ssm_state=r(batch, E, N))


@pytest.mark.parametrize("batch, tiles", [
    # two conv channel blocks (two partials of x_proj), two x_proj tiles, three scan channel blocks
    (3, dict(tile=(16, 8, 4, 8, 2))), (17, dict(tile=(16, 8, 4, 8, 2))),
    # the shape's own tile (d_inner 24, x_proj's 5 + 2 * 4 outputs) over `tile`: three partials, one scan block
    (3, dict(tile=(64, 16, 1, 64, 1), shape_tiles={(24, 13): (8, 8, 1, 32, 1)})),
])
def test_mamba_decode_step_matches_the_reference(batch, tiles):
    g = torch.Generator().manual_seed(batch)
    exact = mamba_args(batch, 24, 4, 4, 5, g)
    low = {k: v.to(DEVICE, torch.float32) if v.is_floating_point() else v.to(DEVICE) for k, v in exact.items()}
    y_ref, conv_ref, ssm_ref = ops.mamba_inner_reference(**exact)
    with torch.no_grad(), ops.use_kernels("triton"), ops.tuned(mamba_step=tiles):
        conv, ssm = low["conv_state"], low["ssm_state"]
        y, conv_out, ssm_out = ops.mamba_inner(**low)
    assert conv_out is conv and ssm_out is ssm  # updated in place
    assert rel_err(y, y_ref) < 1e-5 and rel_err(conv, conv_ref) < 1e-6 and rel_err(ssm, ssm_ref) < 1e-5


def positional_cache(batch, S, Hkv, Dh, filled, g):
    """A cache as the state keeps it: row b holds positions [max(0, f - S), f) of filled[b] = f, in slot
    p mod S; the rest empty (-1) with garbage keys."""
    k = torch.randn(batch, S, Hkv, Dh, generator=g, dtype=torch.float64)
    v = torch.randn(batch, S, Hkv, Dh, generator=g, dtype=torch.float64)
    pos = torch.full((batch, S), -1, dtype=torch.long)
    for b, f in enumerate(filled):
        for p in range(max(0, f - S), f):
            pos[b, p % S] = p
    return k, v, pos


@pytest.mark.parametrize("window, S, filled, T", [
    (9, 8, [3, 20, 8], 1),        # a ring: partly filled, wrapped, just full
    (0, 40, [3, 20, 0], 1),       # full attention, a large preallocated cache
    (9, 8, [3, 20, 8], 6),        # chunks over the cache (positional prefill)
    (0, 40, [3, 20, 0], 5),
])
def test_attention_with_cache_matches_the_reference(window, S, filled, T):
    g = torch.Generator().manual_seed(S + T)
    H, Hkv, Dh = 4, 2, 16
    batch = len(filled)
    starts = [0, 0, -2]  # row 2 (empty cache): its chunk starts with two tokens of left padding
    k_cache, v_cache, cache_pos = positional_cache(batch, S, Hkv, Dh, filled, g)
    q = torch.randn(batch, T, H, Dh, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, T, Hkv, Dh, generator=g, dtype=torch.float64) for _ in range(2))
    q_pos = torch.stack([torch.arange(T) + (f if f else s) for f, s in zip(filled, starts)])
    exact = [x.clone() for x in (k_cache, v_cache, cache_pos)]
    out_ref = ops.attention_with_cache_reference(q, k, v, q_pos, window, *exact)
    low = [x.to(DEVICE, torch.float32) if x.is_floating_point() else x.to(DEVICE) for x in (k_cache, v_cache, cache_pos)]
    with torch.no_grad(), ops.use_kernels("triton"):
        out = ops.attention_with_cache(*(x.to(DEVICE, torch.float32) for x in (q, k, v)), q_pos.to(DEVICE), window,
                                       *low)
    assert rel_err(out, out_ref) < 1e-5
    assert torch.equal(low[2].cpu(), exact[2])  # the same slots took the same positions
    assert rel_err(low[0], exact[0]) < 1e-6 and rel_err(low[1], exact[1]) < 1e-6


@pytest.mark.parametrize("T", [1, 5])
def test_attention_with_cache_without_append_reads_below_the_chunk(T):
    """append=False (SambaY's cross layers): a full-attention cache that already holds the chunk (and
    more: the queries are the chunk's last T of 7) is read only below the queries' first position, and
    left as it is; equal to `attention` over exactly those keys as a prefix. Rows: a filled cache, an
    empty one whose stream starts inside the chunk (left padding), one just started."""
    g = torch.Generator().manual_seed(T)
    H, Hkv, Dh, S, chunk = 4, 2, 16, 40, 7
    starts = [9, -2, 0]  # each row's first chunk position
    batch = len(starts)
    k_cache, v_cache, cache_pos = positional_cache(batch, S, Hkv, Dh, [s + chunk if s > 0 else 0 for s in starts], g)
    for b, s in enumerate(starts):  # the chunk stored by its full layer (padding at negative positions, empty)
        for p in range(max(s, 0), s + chunk):
            cache_pos[b, p] = p
    q = torch.randn(batch, T, H, Dh, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, T, Hkv, Dh, generator=g, dtype=torch.float64) for _ in range(2))
    q_pos = torch.stack([torch.arange(s + chunk - T, s + chunk) for s in starts])
    below = cache_pos.masked_fill(cache_pos >= q_pos[:, :1], -1)
    expected = ops.attention_reference(q, k, v, q_pos, 0, k_cache, v_cache, below)
    exact = [x.clone() for x in (k_cache, v_cache, cache_pos)]
    out_ref = ops.attention_with_cache_reference(q, k, v, q_pos, 0, *exact, append=False)
    assert rel_err(out_ref, expected) < 1e-12
    low = [x.to(DEVICE, torch.float32) if x.is_floating_point() else x.to(DEVICE) for x in (k_cache, v_cache, cache_pos)]
    kept = [x.clone() for x in low]
    with torch.no_grad(), ops.use_kernels("triton"):
        out = ops.attention_with_cache(*(x.to(DEVICE, torch.float32) for x in (q, k, v)), q_pos.to(DEVICE), 0, *low,
                                       append=False)
    assert rel_err(out, expected) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(low, kept))  # nothing stored
    for x, c in zip(exact, (k_cache, v_cache, cache_pos)):
        assert torch.equal(x, c)


@pytest.mark.parametrize("splits", [{}, dict(block_v=32, programs_per_sm=100)], ids=["shipped", "ten-splits"])
@pytest.mark.parametrize("temperature, top", [(0.0, {}), (0.7, {}), (1.3, dict(top_k=7, top_p=0.8))])
def test_choose_tokens_matches_the_reference(temperature, top, splits):
    """The kernel's choice is the reference's, whatever the vocabulary's splits (ties: the first index,
    here a tie across two splits)."""
    from samba_lm.sampling import Sampling, row_seeds

    g = torch.Generator().manual_seed(3)
    batch, V = 5, 300
    logits = torch.randn(batch, V, generator=g) * 3
    logits[0, [40, 250]] = 100.0
    logits = logits.to(DEVICE)
    positions = torch.arange(batch, device=DEVICE) * 1000 + 7
    sampling = Sampling.empty(batch, DEVICE).set(temperature, top.get("top_k"), top.get("top_p"), row_seeds(11, batch))
    stops = torch.tensor([4, -1, -1, -1], device=DEVICE)
    chosen = []
    for backend in ("reference", "triton"):
        tokens = torch.tensor([[1], [2], [4], [5], [6]], device=DEVICE)
        finished = torch.tensor([False, True, False, False, False], device=DEVICE)
        with ops.use_kernels(backend), ops.tuned(sample=splits):
            sampling.next_tokens(logits, positions, tokens, finished, stops)
        chosen.append((tokens.clone(), finished.clone()))
    assert torch.equal(chosen[0][0], chosen[1][0]) and torch.equal(chosen[0][1], chosen[1][1])
    assert chosen[0][0][1, 0] == 2  # a finished row repeats its token
    if temperature == 0:
        assert torch.equal(chosen[0][0][:, 0][[0, 2, 3, 4]], logits.argmax(-1)[[0, 2, 3, 4]])


@pytest.mark.parametrize("T, with_h0", [(37, True), (64, False), (9, True)])
def test_the_segmented_scan_matches_the_reference(T, with_h0):
    """An inference forward with few rows walks time in segments, twice; the result is the one walk's."""
    from samba_lm.ops import triton_scan, tuning

    g = torch.Generator().manual_seed(T)
    batch, E, N = 2, 40, 4
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = dict(u=r(batch, T, E), delta=r(batch, T, E) - 1, A=-torch.rand(E, N, generator=g, dtype=torch.float64) * 3,
                B=r(batch, T, N), C=r(batch, T, N), D=r(E), z=r(batch, T, E), delta_bias=r(E) * 0.3,
                initial_state=r(batch, E, N) if with_h0 else None)
    y_ref, h_ref = ops.selective_scan_reference(**args)
    with torch.no_grad(), ops.use_kernels("triton"), ops.tuned(
            scan=dict(sequential_min_segment=8, sequential_segment_programs_per_sm=10**6)):
        assert triton_scan._segments(tuning.current("scan"), batch, E, T, torch.device(DEVICE)) == max(1, T // 8)
        y, h = ops.selective_scan(**{k: None if v is None else v.to(DEVICE, torch.float32) for k, v in args.items()})
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5


@pytest.mark.parametrize("M, N, K, dtype, with_bias", [(1, 48, 64, torch.bfloat16, False),
                                                       (5, 40, 80, torch.float16, True),
                                                       (20, 64, 96, torch.bfloat16, True)])
def test_the_rows_matmul_matches_the_reference(M, N, K, dtype, with_bias):
    """Decode-sized projections: one to 64 rows; N and K multiples of the tile or not; with a bias or not."""
    g = torch.Generator().manual_seed(M + N)
    x = torch.randn(M, 1, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64)
    b = torch.randn(N, generator=g, dtype=torch.float64) * 4 if with_bias else None
    low_b = b.to(DEVICE, dtype) if with_bias else None
    with torch.no_grad(), ops.use_kernels("triton"):
        y = ops.linear(x.to(DEVICE, dtype), w.to(DEVICE, dtype), low_b)
    low = ops.linear_reference(x.to(dtype).double(), w.to(dtype).double(),  # the same rounded inputs, exactly
                               b.to(dtype).double() if with_bias else None)
    assert y.shape == (M, 1, N) and y.dtype == dtype and rel_err(y, low) < 1e-2
    torch.library.opcheck(torch.ops.samba_lm.rows_matmul.default,
                          (x[:, 0].to(DEVICE, dtype), w.to(DEVICE, dtype), low_b))


@pytest.mark.parametrize("split", [2, 3, 8])
def test_the_split_k_rows_matmul_sums_its_splits_once(split):
    """K in splits, the last to finish summing the partials: the same product, twice in a row (the
    arrival counters re-arm), and every split's order fixed (two calls agree bit for bit)."""
    from samba_lm.ops import triton_linear

    g = torch.Generator().manual_seed(split)
    x = torch.randn(3, 200, generator=g, dtype=torch.float64)
    w = torch.randn(40, 200, generator=g, dtype=torch.float64)
    xs, ws = x.to(DEVICE, torch.bfloat16), w.to(DEVICE, torch.bfloat16)
    tile = (16, 32, 4, 2, split)
    bs = torch.randn(40, generator=g, dtype=torch.float64).to(DEVICE, torch.bfloat16)
    first, second = triton_linear.rows_matmul(xs, ws, bs, tile), triton_linear.rows_matmul(xs, ws, bs, tile)
    assert torch.equal(first, second)
    assert rel_err(first, xs.double() @ ws.double().T + bs.double()) < 1e-2
    assert not triton_linear._COUNTERS[xs.device].any()

