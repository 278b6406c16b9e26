"""The LM head + loss on a GPU, forward+backward: `ops.linear_cross_entropy` (Triton rows, and the
reference's torch rows) against the full logits (eager and torch.compile) and Liger-Kernel's fused
linear cross-entropy, in the same run, at samba-421m's and samba-1.7b's training shapes.

    python benchmarks/bench_cross_entropy.py --out results/
    PYTHONPATH=/path/to/liger_kernel python benchmarks/bench_cross_entropy.py   # with the peer

As the trainer calls it: x [N, D] bf16 (the final norm's output), the weight in fp32 under bf16
autocast, "mean" over N = 8 x 4096 tokens. Per entry: median ms of forward+backward
(triton.testing.do_bench) and the peak memory of one forward+backward above its inputs. Liger gets a
bf16 copy of the weight (its kernel takes one dtype), so its time leaves out the weight's cast. Writes
bench_cross_entropy.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_scan import median_ms  # noqa: E402

from samba_lm import ops  # noqa: E402

SHAPES = {"samba-421m": (32768, 1536, 32000), "samba-1.7b": (32768, 2048, 32000)}


def ours(backend):
    def loss(x, w, t):
        with ops.use_kernels(backend):
            return ops.linear_cross_entropy(x, w, t)
    return loss


def full_logits(x, w, t):
    return F.cross_entropy(F.linear(x, w).float(), t)


def liger():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        print(f"liger_kernel unavailable ({e}): no peer entry", flush=True)
        return None
    fn = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: fn(w, x, t)  # noqa: E731  (its argument order)


def measure(fn, x, w, t) -> dict:
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(x, w, t)
        loss.backward()
        x.grad = w.grad = None

    step()  # compiles, warms the caches
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return dict(ms=median_ms(step, rep=100), peak_gib=(torch.cuda.max_memory_allocated() - base) / 2**30)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_cross_entropy.json and .md")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entries = {"ours, triton": ours("triton"), "ours, reference rows": ours("reference"),
               "full logits, eager": full_logits, "full logits, torch.compile": torch.compile(full_logits)}
    peer = liger()
    rows = []
    for name in args.shapes.split(","):
        N, D, V = SHAPES[name]
        x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(V, D, device="cuda") * D**-0.5).requires_grad_()
        t = torch.randint(0, V, (N,), device="cuda")
        for label, fn in list(entries.items()) + ([("Liger-Kernel fused linear CE", peer)] if peer else []):
            weight = w.detach().bfloat16().requires_grad_() if fn is peer else w
            try:
                r = measure(fn, x, weight, t)
            except torch.OutOfMemoryError as e:
                r = dict(error=f"out of memory ({str(e).splitlines()[0][:60]})")
            rows.append(dict(shape=name, N=N, D=D, V=V, entry=label, **r))
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    lines = [f"# LM head + cross-entropy, forward+backward: {torch.cuda.get_device_name()}", "",
             f"torch {torch.__version__}; x bf16, weight fp32 under bf16 autocast (Liger: a bf16 weight); "
             "median ms; peak GiB above the inputs", "",
             "| shape (N, D, V) | entry | ms | peak GiB |", "|---|---|---|---|"]
    for r in rows:
        cells = (f"{r['ms']:.2f} | {r['peak_gib']:.2f}" if "ms" in r else f"{r['error']} |")
        lines.append(f"| {r['shape']} ({r['N']}, {r['D']}, {r['V']}) | {r['entry']} | {cells} |")
    (out / "bench_cross_entropy.json").write_text(json.dumps(rows, indent=1))
    (out / "bench_cross_entropy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
