"""Where a captured decode step's time goes: samba-1.7b (or --preset), bf16, random weights, after a
prompt that fills the attention window. For each batch size: the replay time (CUDA events, median of
200), the eager step's, and a profile of 5 replays: kernels per step and GPU time by kernel.

    python benchmarks/profile_decode.py --batch 1 16 64 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samba_lm import DecodeEngine, SambaConfig, SambaLM  # noqa: E402


def replay_ms(fn, n=200):
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_table(prof, steps):
    by_name, count = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name] += e.device_time_total / steps
            count[e.name] += 1
    total = sum(by_name.values())
    rows = sorted(((t, count[n] / steps, n) for n, t in by_name.items()), reverse=True)
    return total, sum(count.values()) / steps, rows


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="samba-1.7b")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompt", type=int, default=2100, help="prompt tokens (fill the window: 2047 cached keys)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = SambaLM(SambaConfig.from_preset(args.preset))
    model = model.to(torch.bfloat16).eval()
    cfg = model.config
    results = {}
    for B in args.batch:
        capacity = args.prompt + 4096 if cfg.grows else None  # full-attention caches: the whole run up front
        engine = DecodeEngine(model, B, capacity=capacity)
        stream = engine.generate_stream(torch.randint(0, cfg.vocab_size, (B, args.prompt), device="cuda"),
                                        max_new_tokens=4000)
        next(stream)
        engine._advance()  # the eager first step and the capture
        graph = next(iter(engine._graphs.graphs.values()))
        graph_ms = replay_ms(graph.replay)
        eager_ms = replay_ms(engine._step, n=20)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
        total, kernels, rows = kernel_table(prof, 5)
        results[B] = dict(graph_ms=graph_ms, eager_ms=eager_ms, kernel_ms=total / 1e3, kernels=kernels,
                          top=[(round(t / 1e3, 4), c, n[:90]) for t, c, n in rows[:30]])
        print(f"\n=== {args.preset} batch {B}: graph {graph_ms:.3f} ms/step ({B / graph_ms * 1e3:,.0f} tok/s), eager "
              f"{eager_ms:.2f} ms, {kernels:.0f} kernels/step, kernel time {total / 1e3:.3f} ms", flush=True)
        for t, c, n in rows[:30]:
            print(f"{t / 1e3:8.4f} ms {c:5.0f}x  {n[:110]}")
        del engine, stream, graph
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"profile_decode_{args.preset}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
