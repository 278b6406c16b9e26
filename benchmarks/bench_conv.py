"""The causal conv1d's Triton kernels on a GPU over a sweep of their tiles, against causal_conv1d (CUDA,
built by build_peers.sh) in the same run, at Mamba's training sizes (d_inner 4096, width 4, bf16).

    python benchmarks/bench_conv.py --out results/

For each (B, L) it times the forward alone and forward+backward (median ms, triton.testing.do_bench),
the latter with each backward (fused and two-pass) at its shipped tiles (`ConvTuning` in
ops/triton_conv.py). At the first shape it sweeps each field on its own, the others as shipped: the
forward's (rows loaded ahead, BLOCK_E, warps) and then, with the best of those, its steps a program
(fwd_tiles_per_program x rows); the two-pass backward's (BLOCK_T, BLOCK_E, warps); the fused
backward's tile and steps a program as the forward's. It reports the best of each against the shipped
tiles and the peer, and writes bench_conv.json, with the host time of one forward+backward at a tiny
shape (ours and the peer's). Floors: bytes / measured copy bandwidth, with the forward reading x and
writing y, the backward reading x and dy and writing dx (bf16 each; the float32 dpre of our two-pass
backward is extra traffic the floor does not grant).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_scan import copy_bandwidth, fwd_bwd, median_ms  # noqa: E402

from samba_lm import ops  # noqa: E402
from samba_lm.ops import tuning  # noqa: E402

E, K = 4096, 4
# (rows loaded ahead, BLOCK_E, warps): 2 to 8 channels a thread.
FWD_TILES = [(rows, block_e, warps) for rows in (4, 8, 16)
             for block_e, warps in ((64, 1), (128, 1), (256, 1), (256, 2), (512, 2), (512, 4))]
BWD_TILES = [tile for tile in itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8))  # (BLOCK_T, BLOCK_E, warps)
             if tile[0] * tile[1] <= 128 * 32 * tile[2]]  # over 128 elements a thread: spills
FUSED_TILES = [(rows, block_e, warps) for rows in (2, 4, 8)
               for block_e, warps in ((64, 1), (128, 1), (256, 1), (256, 2), (512, 2), (1024, 4))]
STEPS = (128, 256, 512)  # time steps a program of the forward or the fused backward


def timed(fn, args, backward: bool) -> float:
    with ops.use_kernels("triton"):
        return median_ms((lambda: fn(**args)) if not backward else
                         fwd_bwd(fn, {k: v.clone() for k, v in args.items()}, {"x", "weight", "bias"}), rep=50)


def sweep(args, field: str, values, backward: bool, **fixed) -> dict:
    """Milliseconds per value of one ConvTuning field, the others as shipped or as `fixed`."""
    times = {}
    for value in values:
        try:
            with ops.tuned(conv={**fixed, field: value}):
                times[value] = timed(ops.causal_conv1d, args, backward)
        except Exception as e:  # out of resources
            print(f"{field} {value}: failed ({type(e).__name__})", flush=True)
    return times


def sweeps(args, backward: bool) -> dict:
    """Each tile field on its own, then its program length with the best tile."""
    if not backward:
        out = {"fwd_tile": sweep(args, "fwd_tile", FWD_TILES, False)}
        tile = min(out["fwd_tile"], key=out["fwd_tile"].get)
        out["fwd_tiles_per_program"] = sweep(args, "fwd_tiles_per_program", [s // tile[0] for s in STEPS], False,
                                             fwd_tile=tile)
        return out
    out = {"bwd_tile": sweep(args, "bwd_tile", BWD_TILES, True, fused_backward=False),
           "fused_tile": sweep(args, "fused_tile", FUSED_TILES, True, fused_backward=True)}
    tile = min(out["fused_tile"], key=out["fused_tile"].get)
    out["fused_tiles_per_program"] = sweep(args, "fused_tiles_per_program", [s // tile[0] for s in STEPS],
                                           True, fused_backward=True, fused_tile=tile)
    return out


def host_us(fn, x, weight, bias, dy, repeats=1000) -> float:
    """Host microseconds of one forward+backward at a shape too small to keep the GPU busy."""
    def step():
        fn(x, weight, bias).backward(dy)
    for _ in range(50):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e6


def host_times(peer) -> dict:
    """Ours (eager, through autograd) and the peer's, at B1 L16 E256."""
    x = torch.randn(1, 16, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(256, K, device="cuda", requires_grad=True)
    bias = torch.randn(256, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    with ops.use_kernels("triton"):
        out = {"ours_us": host_us(lambda *a: ops.causal_conv1d(*a)[0], x, weight, bias, dy)}
    if peer is not None:
        xp = x.detach().transpose(1, 2).contiguous().requires_grad_(True)
        out["peer_us"] = host_us(lambda x, w, b: peer(x, w, b, activation="silu"), xp, weight, bias,
                                 dy.transpose(1, 2).contiguous())
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_conv.json")
    p.add_argument("--shapes", default="8x4096,8x16384,1x4096", help="comma-separated BxL to time")
    p.add_argument("--no-sweep", action="store_true", help="only the shipped tiles, the baseline and the peer "
                   "(otherwise the first shape is swept too)")
    a = p.parse_args()
    try:
        from causal_conv1d import causal_conv1d_fn as peer
    except ImportError as e:
        print(f"causal_conv1d unavailable ({e}): no peer column")
        peer = None
    bw, rows = copy_bandwidth(), []
    for shape in a.shapes.split(","):
        batch, L = map(int, shape.split("x"))
        x = torch.randn(batch, L, E, device="cuda", dtype=torch.bfloat16)
        args = dict(x=x, weight=torch.randn(E, K, device="cuda"), bias=torch.randn(E, device="cuda"))
        for mode in ("fwd", "fwd+bwd"):
            backward = mode == "fwd+bwd"
            t = tuning.current("conv")
            row = dict(B=batch, L=L, mode=mode, floor_ms=2 * x.numel() * (5 if backward else 2) / bw * 1e3,
                       shipped_ms=timed(ops.causal_conv1d, args, backward),
                       shipped=dataclasses.asdict(t))
            if backward:
                for name, fused in (("two_pass_ms", False), ("fused_ms", True)):
                    with ops.tuned(conv=dict(fused_backward=fused)):
                        row[name] = timed(ops.causal_conv1d, args, True)
            if peer is not None:
                pargs = dict(x=x.transpose(1, 2).contiguous(), weight=args["weight"], bias=args["bias"], activation="silu")
                row["peer_ms"] = median_ms((lambda: peer(**pargs)) if not backward else
                                           fwd_bwd(peer, {k: v.clone() if torch.is_tensor(v) else v
                                                          for k, v in pargs.items()}, {"x", "weight", "bias"}), rep=50)
            if not a.no_sweep and shape == a.shapes.split(",")[0]:  # the sweep at the first shape
                swept = sweeps(args, backward)
                row["sweep"] = {field: {str(v): ms for v, ms in times.items()} for field, times in swept.items()}
                best = {field: min(times, key=times.get) for field, times in swept.items() if times}
                row["best"] = {field: [str(v), swept[field][v]] for field, v in best.items()}
            rows.append(row)
            print({k: v for k, v in row.items() if k != "sweep"}, flush=True)
            torch.cuda.empty_cache()
    host = host_times(peer)
    print("host time of one forward+backward at B1 L16 E256:", host, flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_conv.json").write_text(json.dumps({"rows": rows, "copy_bw": bw, "host": host,
                                                     "device": torch.cuda.get_device_name()}, indent=1))
    print("| B | L | pass | shipped ms | two-pass ms | fused ms | best ms (field: value) | causal_conv1d ms | floor ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in rows:
        best = "; ".join(f"{ms:.3f} ({field}: {v})" for field, (v, ms) in r.get("best", {}).items())
        print(f"| {r['B']} | {r['L']} | {r['mode']} | {r['shipped_ms']:.3f} | {r.get('two_pass_ms', nan):.3f} | "
              f"{r.get('fused_ms', nan):.3f} | {best} | {r.get('peer_ms', nan):.3f} | {r['floor_ms']:.3f} |")


if __name__ == "__main__":
    main()
