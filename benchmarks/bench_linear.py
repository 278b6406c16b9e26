"""A decode step's projections on a GPU: our few-rows Triton kernel (`ops/triton_linear.py`) against
cuBLAS (`F.linear`), in the same run, at the shapes of samba-1.7b and llama3-1.6b (and with --models, of
phi4-mini-flash), 1, 16 and 64 rows.

    python benchmarks/bench_linear.py --out results/
    python benchmarks/bench_linear.py --models phi4-mini-flash --rows 1,16 --out results/

Each timing is one CUDA graph that multiplies by enough copies of the weight to overflow the L2 (a
decode step reads each weight once, from HBM), divided by the copies: kernel time plus the gap a
graph leaves between kernels, as in a captured decode step. Reports median microseconds and the
weights' bytes over that time; writes the best tile per shape (`LinearTuning.tiles` in triton_linear.py
takes those where ours wins) to bench_linear.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samba_lm.ops import triton_linear  # noqa: E402

SHAPES = {  # (N, K) of each distinct decode projection
    "samba-1.7b": {"mlp gate_up": (16384, 2048), "mlp down": (2048, 8192), "mamba in_proj": (8192, 2048),
                   "mamba out_proj": (2048, 4096), "attention qkv": (2560, 2048), "attention out": (2048, 2048),
                   "tied head": (50304, 2048)},
    "phi4-mini-flash": {"mlp fc1": (20480, 2560), "mlp fc2": (2560, 10240), "mamba in_proj": (10240, 2560),
                        "mamba/gmu out_proj": (2560, 5120), "attention Wqkv, gmu in_proj": (5120, 2560),
                        "mamba x_proj": (192, 5120), "mamba dt_proj": (5120, 160),
                        "attention out, cross q": (2560, 2560), "tied head": (200064, 2560)},
}
TILES = [(bn, bk, w, s, 1) for bn in (16, 32, 64) for bk in (256, 512) for w, s in ((4, 4), (4, 6), (8, 4))]
TILES += [(bn, 128, 4, s, 1) for bn in (32, 64, 128) for s in (3, 4, 6)]  # shorter K steps, more in flight
# K splits where the columns alone give too few programs to keep every SM streaming
SPLIT_TILES = [(bn, bk, 4, 4, split) for bn in (16, 32, 64) for bk in (128, 256, 512) for split in (2, 4, 8)]
SPLIT_MAX_N = 4096
L2_BYTES = 512 * 2**20  # the copies of a weight that one timing walks through: several times the 60 MB L2


def graphed_us(fn_of_copy, copies: int) -> float:
    """Median microseconds per call of fn_of_copy(i), i over the copies, captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn_of_copy(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn_of_copy(i)
    return do_bench(graph.replay, warmup=10, rep=40, return_mode="median") * 1e3 / copies


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_linear.json")
    p.add_argument("--models", default="samba-1.7b", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--rows", default="1,16,64", help="comma-separated row counts (decode batch sizes)")
    args = p.parse_args()
    models = args.models.split(",")
    if unknown := [m for m in models if m not in SHAPES]:
        p.error(f"--models: unknown {unknown}; known: {', '.join(SHAPES)}")
    shapes = {f"{model} {name}": shape for model in models for name, shape in SHAPES[model].items()}
    rows, best = [], {}
    for M in (int(m) for m in args.rows.split(",")):
        for name, (N, K) in shapes.items():
            nbytes = N * K * 2
            copies = max(2, math.ceil(L2_BYTES / nbytes))
            weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            cublas = graphed_us(lambda i: F.linear(x, weights[i]), copies)
            ref = F.linear(x, weights[0]).float()
            ours = {}
            for tile in TILES + (SPLIT_TILES if N <= SPLIT_MAX_N else []):
                try:
                    err = (triton_linear.rows_matmul(x, weights[0], tile=tile).float() - ref).norm() / ref.norm()
                    assert err < 1e-2, f"tile {tile}: relative error {err:.2e}"
                    ours[tile] = graphed_us(lambda i: triton_linear.rows_matmul(x, weights[i], tile=tile), copies)
                except Exception as e:  # a tile over the shared memory, say
                    print(f"  {name} M={M} tile {tile}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            tile = min(ours, key=ours.get)
            row = dict(shape=name, M=M, N=N, K=K, cublas_us=cublas, cublas_tb_s=nbytes / cublas / 1e6,
                       ours_us=ours[tile], ours_tb_s=nbytes / ours[tile] / 1e6, tile=tile,
                       unsplit_us=min(t for k, t in ours.items() if k[4] == 1))
            rows.append(row)
            if ours[tile] < cublas:
                best[f"{triton_linear.row_class(M)},{N},{K}"] = tile
            print(f"{name:40s} M={M:2d}: cuBLAS {cublas:7.2f} us ({row['cublas_tb_s']:.2f} TB/s), "
                  f"ours {ours[tile]:7.2f} "
                  f"us ({row['ours_tb_s']:.2f} TB/s) tile {tile}; unsplit {row['unsplit_us']:7.2f} us", flush=True)
            del weights
            torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_linear.json").write_text(json.dumps(dict(rows=rows, tiles=best,
                                                                      device=torch.cuda.get_device_name()), indent=1))
    print(json.dumps(best))


if __name__ == "__main__":
    main()
