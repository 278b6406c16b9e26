"""The Mamba mixer's decode step between its projections on a GPU: our two fused kernels
(`ops/triton_mamba.py`: the conv step with x_proj's partials, the scan step with dt_proj) over a sweep
of their tiles, against the reference composition of ops, at samba-1.7b's sizes (d_inner 4096, d_state
16, dt_rank 128, conv 4) and 1, 16 and 64 rows.

    python benchmarks/bench_mamba_step.py --out results/

Each timing is one CUDA graph over enough layers (their own weights and states) to overflow the L2, as
a decode step meets them, divided by the layers. The conv kernel's channels per program fix how many
partials the scan kernel sums, so the scan is swept for each; the best pair per batch and the shipped
tile (`MambaStepTuning.tile` in triton_mamba.py, one for every batch) are reported and written to bench_mamba_step.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_linear import graphed_us  # noqa: E402

from samba_lm import ops  # noqa: E402
from samba_lm.ops import triton_mamba  # noqa: E402

E, N, R, K = 4096, 16, 128, 4
LAYERS = 48  # x_proj 1.3 MB, dt_proj 1 MB and the states per layer: over the L2 at every batch
CONV = list(itertools.product((64, 128, 256), (16, 32), (2, 4, 8)))  # (channels, x_proj tile, warps)
SCAN = list(itertools.product((16, 32, 64, 128), (1, 2, 4, 8)))  # (channels, warps)


def layer(batch):
    d = dict(device="cuda")
    bf = dict(dtype=torch.bfloat16, **d)
    return dict(xz=torch.randn(batch, 1, 2 * E, **bf), positions=torch.arange(batch, **d)[:, None] + 4096,
                conv_weight=torch.randn(E, K, **bf), conv_bias=torch.randn(E, **bf),
                x_proj_weight=torch.randn(R + 2 * N, E, **bf) * 0.02, dt_proj_weight=torch.randn(E, R, **bf) * 0.1,
                dt_proj_bias=torch.randn(E, **bf) * 0.1 - 4, A_log=torch.rand(E, N, **d), D=torch.randn(E, **d),
                conv_state=torch.randn(batch, E, K - 1, **bf), ssm_state=torch.randn(batch, E, N, **d))


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_mamba_step.json")
    p.add_argument("--batches", default="1,16,64", help="comma-separated rows to time")
    args = p.parse_args()
    rows, best = [], {}
    for batch in map(int, args.batches.split(",")):
        layers = [layer(batch) for _ in range(LAYERS)]
        with ops.use_kernels("reference"):
            reference = graphed_us(lambda i: ops.mamba_inner(**layers[i]), LAYERS)
        conv_args = lambda i: [layers[i][k] for k in  # noqa: E731
                               ("xz", "positions", "conv_weight", "conv_bias", "conv_state", "x_proj_weight")]
        conv_us, scan_us = {}, {}
        for tile in CONV:
            conv_us[tile] = graphed_us(lambda i: triton_mamba.conv_step(*conv_args(i), tile=tile), LAYERS)
        for channels in sorted({c for c, _, _ in CONV}):
            conv_tile = (channels, 32, 4)
            outs = [triton_mamba.conv_step(*conv_args(i), tile=conv_tile) for i in range(LAYERS)]
            for tile in SCAN:
                scan_us[channels, *tile] = graphed_us(lambda i: triton_mamba.scan_step(
                    layers[i]["xz"], *outs[i], *[layers[i][k] for k in ("dt_proj_weight", "dt_proj_bias", "A_log",
                                                                         "D", "ssm_state")],
                    tile=(*conv_tile, *tile)), LAYERS)
        pairs = {}
        for channels in sorted({c for c, _, _ in CONV}):
            c = min((t for t in CONV if t[0] == channels), key=conv_us.get)
            s = min((t for t in scan_us if t[0] == channels), key=scan_us.get)
            pairs[(*c, *s[1:])] = conv_us[c] + scan_us[s]
        tile = min(pairs, key=pairs.get)
        shipped = triton_mamba.MambaStepTuning().tile
        row = dict(batch=batch, reference_us=reference, best_us=pairs[tile], tile=tile,
                   conv_us=conv_us[tile[:3]], scan_us=scan_us[(tile[0], *tile[3:])], shipped_tile=shipped,
                   shipped_us=conv_us.get(shipped[:3], float("nan")) + scan_us.get((shipped[0], *shipped[3:]),
                                                                                    float("nan")),
                   pairs={str(k): v for k, v in pairs.items()})
        rows.append(row)
        best[batch] = tile
        print(f"batch {batch:3d}: reference {reference:7.2f} us, ours {pairs[tile]:6.2f} us (conv {row['conv_us']:.2f} "
              f"+ scan {row['scan_us']:.2f}) tile {tile}; shipped {shipped} {row['shipped_us']:.2f} us", flush=True)
        del layers
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_mamba_step.json").write_text(json.dumps(
        dict(rows=rows, tiles=best, device=torch.cuda.get_device_name()), indent=1))
    print(json.dumps(best))


if __name__ == "__main__":
    main()
