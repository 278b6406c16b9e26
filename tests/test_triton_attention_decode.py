"""The attention decode kernel against the float64 reference (on CPUs through TRITON_INTERPRET=1).

Tolerances follow flash-attention's rule: the kernel's error against float64 may be a small multiple
of the error of the reference computed in the kernel's own dtype.
"""

import pytest
import torch

from samba_lm import ops
from samba_lm.ops import attention_reference

triton = pytest.importorskip("triton", reason="Triton kernels need the `triton` package (pip install triton)")
from samba_lm.ops import triton_attention_decode, tuning  # noqa: E402
from samba_lm.ops.triton_attention_decode import attention_decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# Tilings that make interpreter-sized caches take every path: several tiles in a split (online
# softmax), several splits (the merge), splits of one tile (some entirely masked).
TILINGS = {
    "default": {},
    "one-split-of-16-key-tiles": dict(keys_per_tile=16, min_split_blocks=10**6),
    "splits-of-two-16-key-tiles": dict(keys_per_tile=16, min_split_blocks=2, programs_per_sm=10**6),
    "splits-of-one-16-key-tile": dict(keys_per_tile=16, min_split_blocks=1, programs_per_sm=10**6),
}


@pytest.fixture(params=list(TILINGS)[:3])
def tiling(request):
    with ops.tuned(attention_decode=TILINGS[request.param]):
        yield


@pytest.fixture
def small_splits():
    with ops.tuned(attention_decode=TILINGS["splits-of-one-16-key-tile"]):
        yield


def ring_positions(q_pos, P, g):
    """[B, P] cache slots in random order holding the last P positions before each query (those >= 0);
    the other slots are empty (-1)."""
    rows = []
    for i in q_pos:
        held = torch.arange(max(0, i - P), i)
        row = torch.full((P,), -1, dtype=torch.int64)
        row[:len(held)] = held
        rows.append(row[torch.randperm(P, generator=g)])
    return torch.stack(rows)


def decode_args(q_pos, prefix_pos, H, Hkv, Dh, seed=0):
    """float64 q, k, v, k_prefix, v_prefix (prefix_pos None: no prefix)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(q_pos)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = dict(q=r(batch, 1, H, Dh) * 2, k=r(batch, 1, Hkv, Dh), v=r(batch, 1, Hkv, Dh),
                q_pos=torch.tensor(q_pos, dtype=torch.int64)[:, None], k_prefix=None, v_prefix=None, prefix_pos=None)
    if prefix_pos is not None:
        P = prefix_pos.shape[1]
        args.update(k_prefix=r(batch, P, Hkv, Dh), v_prefix=r(batch, P, Hkv, Dh), prefix_pos=prefix_pos)
    return args


def to(args, dtype):
    return {k: None if v is None else v.to(DEVICE, dtype if v.is_floating_point() else v.dtype)
            for k, v in args.items()}


def poisoned(args):
    """Empty cache slots filled with NaN, as a cache allocated with torch.empty may hold: the kernel
    must not read them (the reference, which multiplies them by 0, would turn them into NaN)."""
    if args["prefix_pos"] is None:
        return args
    empty = (args["prefix_pos"] < 0)[:, :, None, None]
    return dict(args, k_prefix=args["k_prefix"].masked_fill(empty, float("nan")),
                v_prefix=args["v_prefix"].masked_fill(empty, float("nan")))


def rel_err(a, ref):
    return ((a.cpu().double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(args, window, dtype):
    """Kernel (empty slots poisoned) vs float64 reference within 3x the low-dtype reference's error;
    returns the kernel's output."""
    exact = attention_reference(**args, window=window)
    low = to(args, dtype)
    ref = attention_reference(**low, window=window)
    out = attention_decode(**poisoned(low), window=window)
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    slack = 1e-6 if dtype == torch.float32 else 1e-3
    assert rel_err(out, exact) <= 3 * rel_err(ref, exact) + slack
    return out


@pytest.mark.parametrize("dtype, Dh, H, Hkv, window, P, q_pos", [
    (torch.bfloat16, 64, 8, 2, 16, 20, [20, 7]),  # SWA, the first row's 5 oldest keys past the window
    (torch.float16, 128, 4, 4, 16, 15, [40, 3]),  # SWA ring (the second row not yet full), MHA
    (torch.float32, 64, 8, 1, 0, 70, [100, 30]),  # full attention: a longer cache, partly empty
    (torch.bfloat16, 128, 8, 1, 0, 40, [40, 12]),  # group of 8
    (torch.float32, 128, 8, 2, 24, 23, [23, 60]),  # group of 4
    (torch.float16, 64, 16, 1, 0, 20, [9, 25]),  # group of 16
    (torch.bfloat16, 256, 11, 1, 16, 15, [30, 15]),  # group of 11 (samba-3.8b's heads)
])
def test_decode_matches_reference(dtype, Dh, H, Hkv, window, P, q_pos, tiling):
    g = torch.Generator().manual_seed(P)
    prefix_pos = ring_positions(q_pos, P, g)
    check(decode_args(q_pos, prefix_pos, H, Hkv, Dh, seed=P), window, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_differential_queries(dtype, tiling):
    """Queries half as wide as the keys (`ops.attention`'s differential queries): the kernels read each
    into its half, against the reference (which widens them) in float64; the own key and the cache."""
    q_pos, P = [30, 9], 24
    args = decode_args(q_pos, ring_positions(q_pos, P, torch.Generator().manual_seed(1)), 8, 2, 128, seed=1)
    args["q"] = args["q"][..., :64].contiguous()
    out = check(args, 16, dtype)
    assert out.shape == (2, 1, 8, 128)


def test_window_edges(tiling):
    """Positions exactly at i - window + 1 (visible) and i - window (not), the query's own position
    in the cache (visible), a later one (not), and invisible keys that would dominate if counted."""
    window, i = 10, 50
    edges = torch.tensor([i - window + 1, i - window, i - window - 1, i, i + 1, -1, i - 3, i - 5, 2, -7])
    perm = torch.randperm(len(edges), generator=torch.Generator().manual_seed(0))
    prefix_pos = edges[perm][None, :].repeat(2, 1)
    prefix_pos[1] = prefix_pos[1].flip(0)
    args = decode_args([i, i], prefix_pos, 4, 2, 64)
    invisible = ((i - prefix_pos >= window) | (prefix_pos > i))[:, :, None, None]
    args["k_prefix"] = torch.where(invisible, args["q"][:, :, :2] * 50, args["k_prefix"])  # huge scores
    for dtype in (torch.float32, torch.bfloat16):
        check(args, window, dtype)


def test_empty_splits_and_padding_queries(small_splits):
    """Four splits of 16 keys where the first two see nothing (empty or past the window); a padding
    row (negative position) and a row whose own key is all it sees return zeros / its own value."""
    window, P = 20, 64
    pos = torch.full((3, P), -1, dtype=torch.int64)
    pos[:, 16:32] = torch.arange(0, 16)  # past the window of a query at 60
    pos[:, 32:] = torch.arange(41, 73).flip(0)  # 41..59 visible, 60.. future slots
    args = decode_args([60, -3, 0], pos, 8, 2, 64)
    args["prefix_pos"][2] = -1  # the third row: an empty cache, only the own key at position 0
    splits = triton_attention_decode._splits(tuning.current("attention_decode"), P, 16, 3 * 2, torch.device(DEVICE))
    assert splits == (16, 4)
    for dtype in (torch.float32, torch.float16):
        out = check(args, window, dtype).cpu()
        assert (out[1] == 0).all()
        torch.testing.assert_close(out[2], args["v"][2].repeat_interleave(4, 1).to(dtype), rtol=0, atol=0)


def test_no_prefix():
    args = decode_args([5, -1, 0], None, 8, 2, 64)
    out = check(args, 8, torch.bfloat16).cpu()
    torch.testing.assert_close(out[0], args["v"][0].repeat_interleave(4, 1).to(torch.bfloat16), rtol=0, atol=0)
    assert (out[1] == 0).all()


def test_splits_heuristic(monkeypatch):
    """Splits cover the cache in whole tiles, as many as fill the GPU's SMs when B * Hkv alone does
    not, at most `max_splits`."""
    monkeypatch.setattr(triton_attention_decode, "multiprocessors", lambda device: 132)
    t = tuning.current("attention_decode")
    splits = lambda P, programs: triton_attention_decode._splits(t, P, 64, programs, torch.device("cuda"))  # noqa: E731
    for P, programs in [(1, 1), (2047, 4), (2047, 64), (4096, 1), (10**6, 1), (8192, 512), (8192, 1024)]:
        keys, n = splits(P, programs)
        assert keys % 64 == 0 and (n - 1) * keys < P <= n * keys and n <= t.max_splits
    assert splits(2047, 4) == (64, 32)  # 128 programs, one tile each
    assert splits(2047, 64) == (256, 8)  # 512 programs
    assert splits(8192, 512) == (4096, 2)  # 1024 programs
    assert splits(8192, 1024) == (8192, 1)  # B * Hkv fills the GPU alone
    assert splits(10**6, 1) == (7872, 128)


@pytest.mark.parametrize("change, message", [
    (dict(q=torch.zeros(2, 2, 4, 64)), "q must have layout"),
    (dict(q=torch.zeros(2, 1, 4, 24), k=torch.zeros(2, 1, 2, 24), v=torch.zeros(2, 1, 2, 24)), "power of two"),
    (dict(k=torch.zeros(2, 1, 3, 64)), "must divide"),
    (dict(q=torch.zeros(2, 1, 4, 48)), "or half of it"),
    (dict(q=torch.zeros(2, 1, 3, 32), k=torch.zeros(2, 1, 1, 64), v=torch.zeros(2, 1, 1, 64),
          k_prefix=torch.zeros(2, 5, 1, 64), v_prefix=torch.zeros(2, 5, 1, 64)), "even number"),
    (dict(v=torch.zeros(2, 1, 2, 64, dtype=torch.float16)), "v must be"),
    (dict(q_pos=torch.zeros(2, 1, dtype=torch.int32)), "q_pos must be"),
    (dict(window=-1), "window"),
    (dict(prefix_pos=None), "come together"),
    (dict(prefix_pos=torch.zeros(2, 6, dtype=torch.int64)), "prefix_pos must be"),
])
def test_argument_errors(change, message):
    args = dict(q=torch.zeros(2, 1, 4, 64), k=torch.zeros(2, 1, 2, 64), v=torch.zeros(2, 1, 2, 64),
                q_pos=torch.zeros(2, 1, dtype=torch.int64), window=0, k_prefix=torch.zeros(2, 5, 2, 64),
                v_prefix=torch.zeros(2, 5, 2, 64), prefix_pos=torch.zeros(2, 5, dtype=torch.int64))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        attention_decode(**{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay():
    """Captured once, replayed after the cache and position change in place (as in a decode loop)."""
    g = torch.Generator().manual_seed(0)
    args = to(decode_args([300, 40], ring_positions([300, 40], 255, g), 16, 4, 128), torch.bfloat16)
    attention_decode(**args, window=256)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = attention_decode(**args, window=256)
    args["q_pos"] += 1
    args["prefix_pos"][args["prefix_pos"] == args["prefix_pos"].max()] = -1
    args["k_prefix"].normal_()
    graph.replay()
    torch.testing.assert_close(out, attention_decode(**args, window=256), rtol=0, atol=0)
