"""Sliding-window attention on a GPU: our Triton kernels against compiled FlexAttention (sliding-window
block mask) and PyTorch SDPA (full causal: it has no window), in the same run.

    python benchmarks/bench_attention.py --out results/     # the issue's table
    python benchmarks/bench_attention.py --sweep train      # tile shapes of our kernels (or decode)

Reports median milliseconds (triton.testing.do_bench) and TFLOP/s counted over the visible (query,
key) pairs only (4 Dh FLOPs per pair and head forward, 2.5x that backward), so that a kernel that
skips nothing outside the window is not credited for it. Layouts: ours [B, L, H, Dh] (what the layer
produces), FlexAttention's and SDPA's [B, H, L, Dh]; each gets its own. Decode: one token against a
full ring of W-1 cached keys, in a CUDA graph, against the floor of reading the cache once at the
copy bandwidth, and against a graph that does nothing but read the same bytes once (what a read of
that size achieves, launch and ramp included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import copy_bandwidth, graphed_ms, median_ms  # noqa: E402

from samba_lm import ops  # noqa: E402
from samba_lm.ops import triton_attention, tuning  # noqa: E402

WINDOW = 2048
SHAPES = [(4, 4096), (1, 16384), (1, 65536)]
HEADS = [(16, 4, 128), (32, 4, 64)]  # (query heads, key/value heads, head dim): Samba-421M-like, Samba-1.7B


def visible_pairs(L: int, W: int) -> int:
    """Sum over queries i of min(i + 1, W): the (query, key) pairs a sliding window sees."""
    return W * (W + 1) // 2 + (L - W) * W if L >= W else L * (L + 1) // 2


def make_inputs(batch, L, H, Hkv, Dh, grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda h: torch.randn(batch, L, h, Dh, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = mk(H), mk(Hkv), mk(Hkv)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def fwd_bwd(fn, tensors):
    out = fn(*tensors)
    grad = torch.randn_like(out)

    def go():
        for t in tensors:
            t.grad = None
        fn(*tensors).backward(grad)
    return go


def flex_fn(L, W):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < W)

    for knob in ("cache_size_limit", "recompile_limit"):  # one compile per shape, never the eager fallback
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    mask = create_block_mask(sliding, B=None, H=None, Q_LEN=L, KV_LEN=L, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, block_mask=mask, enable_gqa=True)


def run_training(rows, shapes):
    for batch, L in shapes:
        for H, Hkv, Dh in HEADS:
            pos = torch.arange(L, device="cuda")[None].expand(batch, L)
            ours = lambda q, k, v: ops.attention(q, k, v, pos, WINDOW)  # noqa: E731
            bhld = lambda fn: (lambda q, k, v: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))  # noqa: E731
            flex = flex_fn(L, WINDOW)
            sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
            pairs = visible_pairs(L, WINDOW) * batch * H
            for mode in ("fwd", "fwd+bwd"):
                row = dict(op="attention", B=batch, L=L, heads=f"{H}/{Hkv}x{Dh}", mode=mode)
                flops = 4 * Dh * pairs * (1 if mode == "fwd" else 3.5)
                for name, fn, layout in [("ours", ours, False), ("flex", flex, True), ("sdpa", sdpa, True)]:
                    tensors = make_inputs(batch, L, H, Hkv, Dh, grad=mode != "fwd")
                    if layout:
                        tensors = [t.detach().transpose(1, 2).contiguous().requires_grad_(mode != "fwd") for t in tensors]
                    with ops.use_kernels("triton"):
                        ms = median_ms((lambda: fn(*tensors)) if mode == "fwd" else fwd_bwd(fn, tensors))
                    row[f"{name}_ms"] = ms
                    row[f"{name}_tflops"] = flops / ms / 1e9
                    del tensors
                if mode == "fwd" and batch == 4:  # ours agrees with FlexAttention
                    q, k, v = make_inputs(batch, L, H, Hkv, Dh)
                    with ops.use_kernels("triton"), torch.no_grad():
                        row["max_abs_diff_vs_flex"] = (ours(q, k, v) - bhld(flex)(q, k, v).transpose(1, 2)).abs().max().item()
                rows.append(row)
                print(row, flush=True)
                torch.cuda.empty_cache()


@triton.jit
def _read_kernel(x_ptr, y_ptr, n, out_ptr, BLOCK: tl.constexpr, PER_PROGRAM: tl.constexpr):
    """Reads x and y (n elements each) once: each program sums PER_PROGRAM blocks of both."""
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(PER_PROGRAM):
        offs = (tl.program_id(0) * PER_PROGRAM + i) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc += tl.load(y_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


def read_ms(x, y):
    """ms of a CUDA graph that reads x and y once (the best of a few program sizes)."""
    best = float("inf")
    for per_program in (1, 4, 16):
        grid = triton.cdiv(x.numel(), 4096 * per_program)
        out = torch.empty(grid, device=x.device)
        run = lambda: _read_kernel[(grid,)](x, y, x.numel(), out, BLOCK=4096, PER_PROGRAM=per_program)  # noqa: E731
        best = min(best, graphed_ms(run))
    return best


def decode_ms(batch, H, Hkv, Dh, sdpa=True):
    """(ours, SDPA) ms of one decode step in a CUDA graph, and the cache (keys, values)."""
    P = WINDOW - 1
    q, k, v = make_inputs(batch, 1, H, Hkv, Dh)
    kp, vp = make_inputs(batch, P, Hkv, Hkv, Dh)[1:]
    q_pos = torch.full((batch, 1), 2 * WINDOW - 2, device="cuda")
    prefix_pos = (torch.arange(P, device="cuda") + WINDOW - 1)[None].expand(batch, P).contiguous()
    with torch.no_grad(), ops.use_kernels("triton"):
        ms = graphed_ms(lambda: ops.attention(q, k, v, q_pos, WINDOW, kp, vp, prefix_pos))
    if not sdpa:
        return ms, None, (kp, vp)
    kk, vv = (torch.cat([kp, k], 1).transpose(1, 2) for kp, k in ((kp, k), (vp, v)))
    with torch.no_grad():
        sdpa = graphed_ms(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, enable_gqa=True))
    return ms, sdpa, (kp, vp)


def run_decode(rows, bw):
    """One token per sequence against a full ring of W-1 keys (positions W-1 .. 2W-3 in ring order)."""
    for H, Hkv, Dh in HEADS:
        for batch in (1, 16, 64):
            ms, sdpa, cache = decode_ms(batch, H, Hkv, Dh)
            nbytes = sum(t.numel() * t.element_size() for t in cache)
            row = dict(op="attention decode", B=batch, L=WINDOW, heads=f"{H}/{Hkv}x{Dh}", mode="graph", ours_ms=ms,
                       sdpa_ms=sdpa, floor_ms=nbytes / bw * 1e3, read_ms=read_ms(*cache))
            rows.append(row)
            print(row, flush=True)


def table(rows, bw) -> str:
    lines = [f"# Sliding-window attention: {torch.cuda.get_device_name()}, {datetime.date.today().isoformat()}", "",
             f"torch {torch.__version__}, triton {triton.__version__}; W={WINDOW}, bf16, median ms "
             f"(triton.testing.do_bench); TFLOP/s over the visible pairs; SDPA is full causal (no window); "
             f"copy bandwidth {bw / 1e12:.2f} TB/s", "",
             "| op | B | L | heads | pass | ours ms | Flex ms | SDPA ms | ours TFLOP/s | Flex TFLOP/s | Flex / ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["op"] == "attention":
            lines.append(f"| {r['op']} | {r['B']} | {r['L']} | {r['heads']} | {r['mode']} | {r['ours_ms']:.3f} | "
                         f"{r['flex_ms']:.3f} | {r['sdpa_ms']:.3f} | {r['ours_tflops']:.0f} | {r['flex_tflops']:.0f} | "
                         f"{r['flex_ms'] / r['ours_ms']:.2f} |")
    lines += ["", "| decode | B | cached keys | heads | ours us | SDPA us | floor us | ours / floor | read us | "
                  "ours / read |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["op"] == "attention decode":
            lines.append(f"| {r['op']} | {r['B']} | {r['L']} | {r['heads']} | {r['ours_ms'] * 1e3:.1f} | "
                         f"{r['sdpa_ms'] * 1e3:.1f} | {r['floor_ms'] * 1e3:.1f} | {r['ours_ms'] / r['floor_ms']:.2f} | "
                         f"{r['read_ms'] * 1e3:.1f} | {r['ours_ms'] / r['read_ms']:.2f} |")
    return "\n".join(lines)


def kernel_ms(fn, reps=20) -> dict:
    """Mean GPU milliseconds per call of each kernel that fn launches (torch.profiler)."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {e.key[:60]: e.device_time_total / reps / 1e3 for e in prof.key_averages() if e.device_time_total > 0}


def sweep():
    """Tiles of each kernel at B=4, L=4096 (16/4 heads x 128, then 32/4 x 64), the others at their
    defaults: the backward alone, the forward alone, then forward+backward for the dQ and the dK, dV
    kernels."""
    results = []
    for H, Hkv, Dh in HEADS:
        pos = torch.arange(4096, device="cuda")[None].expand(4, 4096)
        fn = lambda q, k, v: ops.attention(q, k, v, pos, WINDOW)  # noqa: E731
        q, k, v = make_inputs(4, 4096, H, Hkv, Dh)
        out, lse = triton_attention.attention_forward(q, k, v, pos, WINDOW, None, None, None)
        dout = torch.randn_like(out)
        args = (dout, q, k, v, out, lse, pos, WINDOW, None, None, None)
        bwd = lambda: triton_attention.attention_backward(*args)  # noqa: E731
        results.append(dict(Dh=Dh, tiles_of="backward alone", ms=median_ms(bwd), kernels=kernel_ms(bwd)))
        print(results[-1], flush=True)
        for name, candidates in [
                ("fwd_tiles", [(64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2),
                               (64, 128, 4, 2)]),
                ("dq_tiles", [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
                              (128, 32, 8, 3), (64, 128, 4, 2), (128, 128, 8, 2)]),
                ("dkdv_tiles", [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 3),
                                (128, 64, 8, 2), (128, 32, 4, 2), (32, 64, 4, 2)])]:
            base = getattr(tuning.current("attention"), name)
            for tiles in candidates:
                grad = name != "fwd_tiles"
                tensors = make_inputs(4, 4096, H, Hkv, Dh, grad=grad)
                try:
                    with ops.use_kernels("triton"), ops.tuned(attention={name: {**base, Dh: tiles}}):
                        ms = median_ms(fwd_bwd(fn, tensors) if grad else (lambda: fn(*tensors)))
                except Exception as e:  # out of shared memory etc.
                    ms = str(e)[:80]
                results.append(dict(Dh=Dh, tiles_of=name, tiles=tiles, ms=ms))
                print(results[-1], flush=True)
    return results


def sweep_decode():
    """Batch 16 and 64 against a full window: programs per SM x warps of the split kernel x keys per tile."""
    results = []
    for H, Hkv, Dh in HEADS:
        for batch in (16, 64):
            for per_sm in (2, 4, 8, 16):
                for warps in (2, 4, 8):
                    for block_n in (32, 64):
                        with ops.tuned(attention_decode=dict(programs_per_sm=per_sm, split_warps=warps,
                                                             keys_per_tile=block_n)):
                            us = decode_ms(batch, H, Hkv, Dh, sdpa=False)[0] * 1e3
                        results.append(dict(Dh=Dh, heads=f"{H}/{Hkv}", B=batch, tiles_of="decode",
                                            tiles=(per_sm, warps, block_n), us=us))
                        print(results[-1], flush=True)
    return results


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--sweep", choices=["train", "decode"], help="sweep the tiles of the training or decode kernels")
    p.add_argument("--shapes", default=",".join(f"{b}x{L}" for b, L in SHAPES), help="BxL,BxL,... (training)")
    p.add_argument("--no-decode", action="store_true")
    args = p.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        results = sweep() if args.sweep == "train" else sweep_decode()
        (out / f"attention_sweep_{args.sweep}.json").write_text(json.dumps(results, indent=1))
        return
    bw = copy_bandwidth()
    rows = []
    run_training(rows, shapes)
    if not args.no_decode:
        run_decode(rows, bw)
    md = table(rows, bw)
    t = tuning.current("attention")
    tiles = {n: dict(getattr(t, n)) for n in ("fwd_tiles", "dq_tiles", "dkdv_tiles")}
    (out / "bench_attention.json").write_text(json.dumps({"rows": rows, "copy_bw": bw, "tiles": tiles}, indent=1))
    (out / "bench_attention.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
