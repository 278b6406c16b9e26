"""The RoPE kernel's tiles at training shapes: forward and backward kernel time against a copy of qkv.

    python benchmarks/bench_rope.py --out results/

For each preset in --presets (its heads, key/value heads and head dim), qkv [B, T, (H + 2 Hkv) Dh]
bf16 at --batch x --seq: median ms (triton.testing.do_bench) of the forward kernel (qkv -> rotated q,
k and a copy of v) and of the backward kernel (dq, dk, dv -> dqkv) for every (block_t,
heads_per_program, warps) of the sweep (`RopeTuning` in samba_lm/ops/triton_rope.py), and of
`copy_` of the same qkv, the floor: each pass reads qkv's bytes once and writes them once.
Writes bench_rope.json under --out ($OUT by default).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samba_lm import ops  # noqa: E402
from samba_lm.config import PRESETS  # noqa: E402
from samba_lm.ops import triton_rope  # noqa: E402
from samba_lm.ops.rope import rope_inv_freq  # noqa: E402
from samba_lm.options import HelpFormatter  # noqa: E402


class Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each flag's default."""


def median_ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def sweep(preset: str, args) -> dict:
    cfg = PRESETS[preset]
    H, Hkv, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    qkv = torch.randn(args.batch, args.seq, (H + 2 * Hkv) * Dh, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(args.seq, device="cuda").expand(args.batch, -1).contiguous()
    inv_freq = rope_inv_freq(Dh, cfg.rope_base, qkv.device)
    copy = torch.empty_like(qkv)
    shipped = triton_rope.RopeTuning()
    row = dict(preset=preset, heads=H, kv_heads=Hkv, head_dim=Dh, copy_ms=median_ms(lambda: copy.copy_(qkv)),
               shipped=[str(v) for v in (shipped.block_t, shipped.heads_per_program, shipped.warps)], tiles={})
    q, k, v = triton_rope.rope_forward(qkv, positions, inv_freq, H, Hkv)
    for block_t, heads, warps in itertools.product(args.block_t, args.heads, args.warps):
        with ops.tuned(rope=dict(block_t=block_t, heads_per_program=heads, warps=warps)):
            fwd = median_ms(lambda: triton_rope.rope_forward(qkv, positions, inv_freq, H, Hkv))
            bwd = median_ms(lambda: triton_rope.rope_backward(q, k, v, positions, inv_freq))
        row["tiles"][f"{block_t},{heads},{warps}"] = dict(fwd_ms=fwd, bwd_ms=bwd)
    best = min(row["tiles"], key=lambda t: row["tiles"][t]["fwd_ms"] + row["tiles"][t]["bwd_ms"])
    row["best"] = best
    print(json.dumps({k: v for k, v in row.items() if k != "tiles"} | {"best_ms": row["tiles"][best],
                     "shipped_ms": row["tiles"].get(",".join(row["shipped"]))}), flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--presets", default="samba-421m,samba-1.7b", help="comma-separated presets whose heads to time")
    p.add_argument("--batch", type=int, default=8, help="sequences")
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--block-t", type=ints, default="16,32,64", help="comma-separated steps per program to sweep")
    p.add_argument("--heads", type=ints, default="2,4,8", help="comma-separated heads per program to sweep")
    p.add_argument("--warps", type=ints, default="4,8", help="comma-separated warps per program to sweep")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_rope.json")
    args = p.parse_args()
    unknown = [name for name in args.presets.split(",") if name not in PRESETS]
    if unknown:
        p.error(f"--presets: unknown {unknown}; valid: {', '.join(PRESETS)}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the Triton kernels)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.presets.split(","):  # written after each preset: a run cut short keeps what it timed
        rows.append(sweep(name, args))
        (out / "bench_rope.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows),
                                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
