"""phi4-mini-flash decode with differential attention's mix as one Triton kernel against the
reference's composition of torch ops (the code before the kernel), in one process.

    python benchmarks/bench_differential_mix.py --out results/

Random bf16 weights at the released shape (bench_generate.py's model), the CUDA-graph decode engine
after a --prompt-token prompt, --steps timed steps (bench_generate.py's `engine_rate`) at each batch of
--batches, the two variants alternating --repeats times. Reports ms a step and its ratio to the
weights-plus-state bandwidth floor (at 4.25 TB/s, this project's H200 copy rate). Writes
bench_differential_mix.json under --out ($OUT by default).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_generate as G  # noqa: E402
from samba_lm.ops import differential, dispatch  # noqa: E402
from samba_lm.options import HelpFormatter  # noqa: E402

BANDWIDTH = 4.25e12


class Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each flag's default."""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--batches", default="1,16", help="comma-separated decode batch sizes")
    p.add_argument("--prompt", type=int, default=4096, help="prompt tokens before decoding")
    p.add_argument("--steps", type=int, default=512, help="timed decode steps per measurement")
    p.add_argument("--repeats", type=int, default=2, help="times each variant runs, alternating")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_differential_mix.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    batches = [int(b) for b in args.batches.split(",") if b]
    if min(batches + [args.prompt, args.steps, args.repeats]) < 1:
        p.error("--batches, --prompt, --steps and --repeats must be positive")
    model = G.ours(G.SAMBAY)
    kernel, supports = dispatch._registry["differential_mix"]["triton"]
    variants = {"kernel": kernel, "composition": differential.differential_mix_reference}
    rows, out = [], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for _ in range(args.repeats):
            for name, fn in variants.items():
                dispatch.register("differential_mix", "triton", fn, supports)
                for batch in batches:
                    with torch.inference_mode():
                        rate, _, floor = G.engine_rate(model, batch, args.prompt, args.steps,
                                                       args.prompt + args.steps + 128, BANDWIDTH)
                    rows.append(dict(variant=name, batch=batch, step_ms=1e3 * batch / rate, floor_ms=floor * 1e3,
                                     over_floor=(batch / rate) / floor))
                    print(json.dumps(rows[-1]), flush=True)
                    (out / "bench_differential_mix.json").write_text(json.dumps(rows, indent=1) + "\n")
                    torch.cuda.empty_cache()
    finally:
        dispatch.register("differential_mix", "triton", kernel, supports)


if __name__ == "__main__":
    main()
