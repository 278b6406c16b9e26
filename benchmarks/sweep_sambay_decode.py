"""The two sweeps behind phi4-mini-flash's decode tiles, on a GPU (benchmarks/RESULTS.md, 2026-12-02,
fifth session, calls 5 and 8; they ran as scratch scripts, these are those scripts made flags).

    python benchmarks/sweep_sambay_decode.py --kernel --out results/
    python benchmarks/sweep_sambay_decode.py --mamba-tiles --out results/

--kernel: the decode split kernel alone at phi4-mini-flash's batch-16 shape (40 query heads over 10
paired key/value heads of 128, 4096 filled slots of 4736), three caches in turn so that each call reads
HBM, `triton.testing.do_bench_cudagraph`, over `AttentionDecodeTuning` settings (warps, keys a tile,
pipeline stages, programs an SM): the cross layers' reads (`attention_decode` over the cache's
positions before the token) and the global layer's positional reads (`attention_decode_cached`).

--mamba-tiles: the whole decode step (bench_generate.py's `engine_rate` after a --prompt-token prompt,
random bf16 weights at the released shape) with each candidate tile for the Mamba step of d_inner 5120
(`MambaStepTuning.shape_tiles`), at batch 16 (twice) and 1; "shipped" is the table's own.

Writes sweep_sambay_decode.json under --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_generate as G  # noqa: E402
from samba_lm.ops import tuning  # noqa: E402
from samba_lm.options import HelpFormatter  # noqa: E402

BANDWIDTH = 4.25e12
MAMBA_SHAPE = (5120, 192)  # phi4-mini-flash: d_inner, x_proj outputs (dt_rank 160 + 2 d_state)
MAMBA_TILES = [(256, 32, 2, 32, 1), (256, 32, 2, 64, 1), (256, 32, 2, 64, 2), (256, 32, 2, 128, 2),
               (256, 32, 2, 128, 4), (512, 32, 4, 64, 2), (512, 32, 4, 128, 4), (512, 32, 2, 64, 1)]


class Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each flag's default."""


def kernel_sweep() -> list[dict]:
    import triton

    from samba_lm.ops.triton_attention_decode import attention_decode, attention_decode_cached

    B, H, Hkv, D, P, filled = 16, 40, 10, 128, 4736, 4096
    torch.manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v = r(B, 1, H, D), r(B, 1, Hkv, D), r(B, 1, Hkv, D)
    caches = [(r(B, P, Hkv, D), r(B, P, Hkv, D)) for _ in range(3)]  # 3 x 194 MB: beyond the L2
    pos = torch.arange(P, device="cuda").expand(B, P).clone()
    pos[:, filled:] = -1
    q_pos = torch.full((B, 1), filled, device="cuda", dtype=torch.long)
    turn = itertools.cycle(range(3))

    def cross():
        return attention_decode(q, k, v, q_pos, 0, *caches[next(turn)], pos)

    def positional():
        return attention_decode_cached(q, k, v, q_pos, 0, *caches[next(turn)], pos, append=False)

    nbytes = B * filled * Hkv * D * 2 * 2
    settings = [{}] + [dict(split_warps=w, keys_per_tile=n, split_stages=s, programs_per_sm=p)
                       for w, n, s, p in itertools.product((1, 2, 4, 8), (16, 32, 64, 128), (1, 2, 3, 4), (4, 16))]
    rows = []
    for setting in settings:
        for name, fn in (("cross", cross), ("global", positional)):
            with tuning.tuned(attention_decode=setting):
                try:
                    us = triton.testing.do_bench_cudagraph(fn, rep=30) * 1e3
                except Exception as e:  # a tile over the shared memory, say
                    print(setting, name, f"{type(e).__name__}: {str(e)[:100]}", flush=True)
                    continue
            rows.append(dict(setting=setting or "shipped", reads=name, us=us, tb_s=nbytes / us / 1e6))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def mamba_sweep(prompt: int, steps: int) -> list[dict]:
    model = G.ours(G.SAMBAY)
    rows = []
    for batch in (16, 1, 16):
        for tile in [None] + MAMBA_TILES:
            override = {} if tile is None else dict(shape_tiles={MAMBA_SHAPE: tile})
            with torch.inference_mode(), tuning.tuned(mamba_step=override):
                rate, _, floor = G.engine_rate(model, batch, prompt, steps, prompt + steps + 128, BANDWIDTH)
            rows.append(dict(tile=tile or "shipped", batch=batch, step_ms=1e3 * batch / rate, floor_ms=floor * 1e3,
                             over_floor=(batch / rate) / floor))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--kernel", action="store_true", help="the decode split kernel alone over its settings")
    which.add_argument("--mamba-tiles", action="store_true", help="the decode step with each Mamba step tile")
    p.add_argument("--prompt", type=int, default=4096, help="prompt tokens before decoding (--mamba-tiles)")
    p.add_argument("--steps", type=int, default=384, help="timed decode steps a measurement (--mamba-tiles)")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for sweep_sambay_decode.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    if min(args.prompt, args.steps) < 1:
        p.error("--prompt and --steps must be positive")
    rows = kernel_sweep() if args.kernel else mamba_sweep(args.prompt, args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_sambay_decode.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
