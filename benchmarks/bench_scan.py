"""Selective scan and causal conv1d on a GPU: our Triton kernels against mamba_ssm and causal_conv1d
(CUDA, built from their sdists by build_peers.sh) and our PyTorch reference, in the same run.

    python benchmarks/bench_scan.py --out results/          # the issue's table
    python benchmarks/bench_scan.py --sweep                 # shapes of the Triton scan kernels
    python benchmarks/bench_scan.py --sweep-training-segments   # training with few rows: time segments
    python benchmarks/bench_scan.py --sweep-occupancy       # training: register caps x time segments

Reports median milliseconds (triton.testing.do_bench), the ratio to the peer, and the ratio to a
floor: the larger of bytes / measured copy bandwidth and exponentials / measured exp rate.
Layouts: ours [B, L, E] (what the Mamba layer produces), the peers' [B, E, L]; each gets its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samba_lm import ops  # noqa: E402
from samba_lm.ops import triton_scan, tuning  # noqa: E402

E, N = 4096, 16


def median_ms(fn, rep=200):
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    x = torch.empty(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x))
    return 2 * x.nbytes / (ms * 1e-3)


@triton.jit
def _exp_kernel(x_ptr, n_rep: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    acc = x
    for _ in tl.static_range(n_rep):
        acc = tl.exp(acc * -0.5)
    tl.store(x_ptr + offs, acc)


def exp_rate() -> float:
    x = torch.rand(2**24, device="cuda")
    reps = 64
    ms = median_ms(lambda: _exp_kernel[(x.numel() // 1024,)](x, reps, 1024))
    return x.numel() * reps / (ms * 1e-3)


def scan_inputs(batch, L, dtype=torch.bfloat16, E=E):
    g = dict(device="cuda", dtype=dtype)
    return dict(u=torch.randn(batch, L, E, **g), delta=torch.randn(batch, L, E, **g) * 0.5 - 1,
                A=-torch.rand(E, N, device="cuda") * 8, B=torch.randn(batch, L, N, **g), C=torch.randn(batch, L, N, **g),
                D=torch.randn(E, device="cuda"), z=torch.randn(batch, L, E, **g),
                delta_bias=torch.randn(E, device="cuda") * 0.1)


def fwd_bwd(fn, args, grads):
    leaves = {k: v.requires_grad_(True) if k in grads else v for k, v in args.items()}

    def go():  # each call's own gradients: none added into the last call's (a pass over every input)
        for v in leaves.values():
            if torch.is_tensor(v):
                v.grad = None
        y = fn(**leaves)
        y = y[0] if isinstance(y, tuple) else y
        if y.shape not in dy_cache:  # one upstream gradient per shape, made outside the timed calls' work
            dy_cache[y.shape] = torch.randn_like(y)
        y.backward(dy_cache[y.shape])
    dy_cache = {}
    return go


def peer_scan_args(args):
    t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731  [B, L, *] -> [B, *, L]
    return dict(u=t(args["u"]), delta=t(args["delta"]), A=args["A"], B=t(args["B"]), C=t(args["C"]), D=args["D"],
                z=t(args["z"]), delta_bias=args["delta_bias"], delta_softplus=True)


def scan_floor(batch, L, bw, exps, backward):
    """Forward: read u, delta, z (bf16), B, C; write y. Backward adds dy read and du, ddelta, dz
    writes, and two exponentials per element (the recomputed and the shifted decay)."""
    elems = batch * L * E
    bytes_ = 2 * 4 * elems + 2 * 2 * batch * L * N * 2
    n_exp = elems * N
    if backward:
        bytes_ += 2 * 4 * elems + 4 * 2 * batch * L * N
        n_exp *= 3
    return max(bytes_ / bw, n_exp / exps) * 1e3


def run_scan(rows, bw, exps, peer):
    for batch, L in [(1, 4096), (2, 4096), (8, 4096), (1, 16384), (8, 16384)]:
        args = scan_inputs(batch, L)
        grads = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias"}
        for mode in ("fwd", "fwd+bwd"):
            floor = scan_floor(batch, L, bw, exps, mode == "fwd+bwd")
            with ops.use_kernels("triton"):
                ours = median_ms((lambda: ops.selective_scan(**args)) if mode == "fwd" else
                                 fwd_bwd(ops.selective_scan, {k: v.clone() for k, v in args.items()}, grads))
            row = dict(op="selective_scan", B=batch, L=L, mode=mode, ours_ms=ours, floor_ms=floor)
            if peer is not None:
                pargs = peer_scan_args(args)
                row["peer_ms"] = median_ms((lambda: peer(**pargs)) if mode == "fwd" else
                                           fwd_bwd(peer, {k: v.clone() if torch.is_tensor(v) else v for k, v in pargs.items()},
                                                   grads))
            if batch == 1 and L == 4096:
                with ops.use_kernels("reference"):
                    row["reference_ms"] = median_ms((lambda: ops.selective_scan(**args)) if mode == "fwd" else
                                                    fwd_bwd(ops.selective_scan, {k: v.clone() for k, v in args.items()},
                                                            grads), rep=50)
            rows.append(row)
            print(row, flush=True)
            torch.cuda.empty_cache()


def run_conv(rows, bw, peer):
    K = 4
    for batch, L in [(1, 4096), (8, 4096), (8, 16384)]:
        g = dict(device="cuda", dtype=torch.bfloat16)
        x, w, b = torch.randn(batch, L, E, **g), torch.randn(E, K, device="cuda"), torch.randn(E, device="cuda")
        for mode in ("fwd", "fwd+bwd"):
            bytes_ = 2 * batch * L * E * (2 if mode == "fwd" else 5)  # bf16: x, y; then x, dy, dx
            args = dict(x=x, weight=w, bias=b)
            with ops.use_kernels("triton"):
                ours = median_ms((lambda: ops.causal_conv1d(**args)) if mode == "fwd" else
                                 fwd_bwd(ops.causal_conv1d, {k: v.clone() for k, v in args.items()}, {"x", "weight", "bias"}))
            row = dict(op="causal_conv1d", B=batch, L=L, mode=mode, ours_ms=ours, floor_ms=bytes_ / bw * 1e3)
            if peer is not None:
                pargs = dict(x=x.transpose(1, 2).contiguous(), weight=w, bias=b, activation="silu")
                row["peer_ms"] = median_ms((lambda: peer(**pargs)) if mode == "fwd" else
                                           fwd_bwd(peer, {k: v.clone() if torch.is_tensor(v) else v for k, v in pargs.items()},
                                                   {"x", "weight", "bias"}))
            rows.append(row)
            print(row, flush=True)


def graphed_ms(fn):
    """Median ms of one replay of `fn` captured in a CUDA graph (decode steps are launch-bound)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay)


def run_decode(rows, bw, peer_step, peer_conv_update):
    """One decode step of the scan and the conv, state updated in place, in a CUDA graph."""
    K = 4
    for batch in (1, 16, 64):
        g = dict(device="cuda", dtype=torch.bfloat16)
        args = dict(u=torch.randn(batch, 1, E, **g), delta=torch.randn(batch, 1, E, **g) - 1,
                    A=-torch.rand(E, N, device="cuda") * 8, B=torch.randn(batch, 1, N, **g),
                    C=torch.randn(batch, 1, N, **g), D=torch.randn(E, device="cuda"), z=torch.randn(batch, 1, E, **g),
                    delta_bias=torch.randn(E, device="cuda") * 0.1)
        state = torch.randn(batch, E, N, device="cuda")
        floor = (2 * state.nbytes + E * N * 4 + 5 * batch * E * 2) / bw * 1e3
        with torch.no_grad(), ops.use_kernels("triton"):
            ours = graphed_ms(lambda: ops.selective_scan(**args, initial_state=state))
        row = dict(op="scan decode step", B=batch, L=1, mode="graph", ours_ms=ours, floor_ms=floor)
        if peer_step is not None:
            pa = {k: v[:, 0] if v.dim() == 3 else v for k, v in args.items()}
            row["peer_ms"] = graphed_ms(lambda: peer_step(state, pa["u"], pa["delta"], pa["A"], pa["B"], pa["C"], pa["D"],
                                                          z=pa["z"], dt_bias=pa["delta_bias"], dt_softplus=True))
        rows.append(row)
        print(row, flush=True)
        x, w, b = torch.randn(batch, 1, E, **g), torch.randn(E, K, device="cuda"), torch.randn(E, device="cuda")
        conv_state = torch.randn(batch, E, K - 1, **g)
        with torch.no_grad(), ops.use_kernels("triton"):
            ours = graphed_ms(lambda: ops.causal_conv1d(x, w, b, conv_state))
        row = dict(op="conv decode step", B=batch, L=1, mode="graph", ours_ms=ours,
                   floor_ms=(2 * conv_state.nbytes + w.nbytes + 2 * x.nbytes) / bw * 1e3)
        if peer_conv_update is not None:
            peer_state = torch.randn(batch, E, K - 1, **g)
            row["peer_ms"] = graphed_ms(lambda: peer_conv_update(x[:, 0], peer_state, w, b, activation="silu"))
        rows.append(row)
        print(row, flush=True)


def sweep():
    """Step-at-a-time kernels (channels per program x warps x steps per iteration) against the chunked
    ones, at B=8 and B=1, L=4096; with SWEEP_TILES=1 also the chunked kernels' tiles."""
    grads = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias"}
    results = []

    def time(batch, args, label, fwd=True, **scan):
        with ops.use_kernels("triton"), ops.tuned(scan=dict(training_segment_below_programs_per_sm=0, **scan)):
            f = median_ms(lambda: ops.selective_scan(**args), rep=50) if fwd else float("nan")
            fb = median_ms(fwd_bwd(ops.selective_scan, {k: v.clone() for k, v in args.items()}, grads), rep=30)
        results.append((label, batch, f, fb))
        print(f"{label} B={batch}: fwd {f:.3f} ms  fwd+bwd {fb:.3f} ms", flush=True)

    for batch in (8, 1):
        args = scan_inputs(batch, 4096)
        time(batch, args, "chunked forward, chunked backward", sequential_min_programs_per_sm=10**9,
             sequential_backward=False)
        for cfg in [(32, 1), (64, 1), (64, 2), (128, 2), (16, 1)]:
            for steps in (1, 2):
                for sequential_bwd in (False, True):
                    time(batch, args, f"step-at-a-time forward, channels {cfg[0]} warps {cfg[1]} steps {steps}, "
                                      f"{'step-at-a-time' if sequential_bwd else 'chunked'} backward",
                         fwd=not sequential_bwd, sequential_min_programs_per_sm=0, sequential_forward=cfg,
                         sequential_steps=steps, sequential_backward=sequential_bwd)
        torch.cuda.empty_cache()
    if os.environ.get("SWEEP_TILES") == "1":
        with ops.tuned(scan=dict(sequential_min_programs_per_sm=10**9)):  # the chunked kernels alone
            results += sweep_tiles(grads)
    return results


def sweep_segments():
    """Inference forwards with few rows: time segments (programs per SM targeted, steps per segment at
    least) against one walk and the chunked kernel, at B = 1, 2, 4 and L = 4096, 16384."""
    results = []
    for batch, L in [(1, 4096), (1, 16384), (2, 4096), (4, 4096)]:
        args = scan_inputs(batch, L)
        configs = [("chunked", dict(sequential_min_programs_per_sm=10**9, segment_below_programs_per_sm=0)),
                   ("one walk", dict(sequential_min_programs_per_sm=0, segment_below_programs_per_sm=0))]
        configs += [(f"segments: {pps} programs/SM, >= {minseg} steps",
                     dict(sequential_segment_programs_per_sm=pps, sequential_min_segment=minseg))
                    for pps in (4, 8, 16, 32) for minseg in (64, 256)]
        for label, scan in configs:
            with torch.no_grad(), ops.use_kernels("triton"), ops.tuned(scan=scan):
                ms = median_ms(lambda: ops.selective_scan(**args), rep=50)
                segs = triton_scan._segments(tuning.current("scan"), batch, E, L, torch.device("cuda"))
            results.append((label, batch, L, segs, ms))
            print(f"B={batch} L={L} {label} ({segs} segments): fwd {ms:.3f} ms", flush=True)
    return results


ONE_TARGET = (float("inf"), 0)  # the sweeps set backward_segment_programs_per_sm for every row count


def sweep_training_segments():
    """Training with few rows (forward+backward): time segments, the backward's programs per SM
    targeted, against one walk and the chunked kernels, to place `training_segment_below_programs_per_sm`
    and `backward_segment_programs_per_sm`."""
    grads = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias"}
    results = []
    for batch, e in [(1, 4096), (2, 4096), (4, 4096), (8, 2048), (8, 3072), (8, 4096), (6, 4096)]:
        args = scan_inputs(batch, 4096, E=e)
        configs = [("chunked", dict(sequential_min_programs_per_sm=10**9, training_segment_below_programs_per_sm=0)),
                   ("one walk", dict(sequential_min_programs_per_sm=0, training_segment_below_programs_per_sm=0))]
        configs += [(f"segments: backward {pps} programs/SM", dict(training_segment_below_programs_per_sm=10**6,
                                                                  backward_segment_programs_per_sm=pps,
                                                                  backward_segment_programs_per_sm_above=ONE_TARGET))
                    for pps in (4, 8, 16, 32, 64, 128)]
        for label, scan in configs:
            with ops.use_kernels("triton"), ops.tuned(scan=scan):
                f = median_ms(lambda: ops.selective_scan(**args), rep=50)
                fb = median_ms(fwd_bwd(ops.selective_scan, {k: v.clone() for k, v in args.items()}, grads), rep=50)
                segs = triton_scan._segments(tuning.current("scan"), batch, e, 4096, torch.device("cuda"),
                                             training=True, backward=True)
            results.append(dict(B=batch, E=e, config=label, backward_segments=segs, fwd_ms=f, fwd_bwd_ms=fb))
            print(results[-1], flush=True)
        torch.cuda.empty_cache()
    return results


def _target_for(segments: int, programs: int, sms: int) -> int:
    """The smallest programs-per-SM target for which `_segments` splits time into `segments`."""
    return next(k for k in range(1, 10**4) if triton.cdiv(k * sms, programs) >= segments)


def sweep_occupancy():
    """Training at the presets' scan shapes: the step-at-a-time kernels' register caps (more programs
    resident per SM) against their time segments, the forward (its carries saved) and the backward
    (forward+backward less that forward, in the same configuration) each on their own."""
    grads = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias"}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for batch, e in [(8, 3072), (8, 4096), (4, 4096), (8, 2048)]:
        args = scan_inputs(batch, 4096, E=e)
        programs = batch * triton.cdiv(e, triton_scan.ScanTuning().sequential_forward[0])

        def times(scan):
            with ops.use_kernels("triton"), ops.tuned(scan=scan):
                leaves = {k: v.clone().requires_grad_(k in grads) for k, v in args.items()}
                fwd = median_ms(lambda: ops.selective_scan(**leaves), rep=50)
                fb = median_ms(fwd_bwd(ops.selective_scan, {k: v.clone() for k, v in args.items()}, grads), rep=50)
            return fwd, fb

        default = times({})
        for regs in (0, 168, 128):
            for segs in (1, 2, 3, 4, 5, 6, 8):
                target = _target_for(segs, programs, sms)
                row = dict(B=batch, E=e, programs_per_sm=programs / sms, max_registers=regs, segments=segs,
                           default_fwd_ms=default[0], default_fwd_bwd_ms=default[1])
                try:  # the forward in `segs` segments; then the backward in `segs`, after the default forward's
                    row["fwd_ms"] = times(dict(training_segment_below_programs_per_sm=10**6 if segs > 1 else 0,
                                               sequential_segment_programs_per_sm=target,
                                               training_max_registers=(regs, 0)))[0]
                    fwd, fb = times(dict(training_segment_below_programs_per_sm=10**6,
                                         backward_segment_programs_per_sm=target,
                                         backward_segment_programs_per_sm_above=ONE_TARGET,
                                         training_max_registers=(0, regs)))
                    row["bwd_ms"] = fb - fwd
                except Exception as err:  # out of resources
                    row["error"] = f"{type(err).__name__}: {err}"[:200]
                results.append(row)
                print(row, flush=True)
        torch.cuda.empty_cache()
    return results


def sweep_paths():
    """Training (forward+backward): the step-at-a-time kernels against the chunked ones as the programs
    per SM grow, to place `sequential_min_programs_per_sm`."""
    results = []
    for batch, e in [(1, 4096), (2, 4096), (4, 4096), (2, 2048), (4, 2048), (8, 2048), (8, 3072)]:
        args = scan_inputs(batch, 4096, E=e)
        times = {}
        for label, threshold in (("step at a time", 0), ("chunked", 10**9)):
            with ops.use_kernels("triton"), ops.tuned(scan=dict(sequential_min_programs_per_sm=threshold,
                                                                training_segment_below_programs_per_sm=0)):
                times[label] = median_ms(fwd_bwd(ops.selective_scan, {k: v.clone() for k, v in args.items()}, set(args)),
                                         rep=100)
        per_sm = batch * e / triton_scan.ScanTuning().sequential_forward[0] / torch.cuda.get_device_properties(0).multi_processor_count
        results.append(dict(B=batch, E=e, programs_per_sm=per_sm, **times))
        print(results[-1], flush=True)
    return results


def sweep_tiles(grads):
    args = scan_inputs(8, 4096)
    results = []
    for block_t in (16, 32, 64):
        for be in (8, 16, 32):
            for warps in (4, 8):
                try:
                    with ops.use_kernels("triton"), ops.tuned(scan=dict(block_t=block_t, fwd_tile=(be, warps),
                                                                        bwd_tile=(be, warps))):
                        f = median_ms(lambda: ops.selective_scan(**args), rep=50)
                        fb = median_ms(fwd_bwd(ops.selective_scan, {k: v.clone() for k, v in args.items()}, grads), rep=50)
                except Exception as e:  # out of resources for some tiles
                    print(f"block_t {block_t} block_e {be} warps {warps}: failed ({type(e).__name__})", flush=True)
                    continue
                results.append((block_t, be, warps, f, fb))
                print(f"block_t {block_t:4d} block_e {be} warps {warps}: fwd {f:.3f} ms  fwd+bwd {fb:.3f} ms", flush=True)
    return results


def table(rows, bw, exps, peer_names) -> str:
    lines = [f"# Selective scan and causal conv1d: {torch.cuda.get_device_name()}, "
             f"{datetime.date.today().isoformat()}",
             "", f"torch {torch.__version__}, triton {triton.__version__}; peers: {peer_names}; "
             f"measured copy bandwidth {bw / 1e12:.2f} TB/s, exp rate {exps / 1e12:.2f} T/s; "
             f"E={E}, N={N}, bf16, median ms (triton.testing.do_bench)", "",
             "| op | B | L | pass | ours ms | peer ms | ours / peer | floor ms | ours / floor | reference ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peer = r.get("peer_ms")
        lines.append(f"| {r['op']} | {r['B']} | {r['L']} | {r['mode']} | {r['ours_ms']:.4f} | "
                     f"{peer:.4f} | {r['ours_ms'] / peer:.2f} | " if peer else
                     f"| {r['op']} | {r['B']} | {r['L']} | {r['mode']} | {r['ours_ms']:.4f} | - | - | ")
        ref = f"{r['reference_ms']:.1f}" if "reference_ms" in r else "-"
        lines[-1] += f"{r['floor_ms']:.4f} | {r['ours_ms'] / r['floor_ms']:.1f} | {ref} |"
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--sweep", action="store_true", help="tile and path sweep of the training kernels")
    p.add_argument("--ops", default="scan,conv,decode", help="the table's parts, comma-separated: scan, conv, decode")
    p.add_argument("--sweep-segments", action="store_true", help="time segments of inference forwards with few rows")
    p.add_argument("--sweep-training-segments", action="store_true",
                   help="training with few rows: time segments against one walk and the chunked kernels")
    p.add_argument("--sweep-occupancy", action="store_true",
                   help="training: the step-at-a-time kernels' register caps against their time segments")
    p.add_argument("--sweep-paths", action="store_true",
                   help="training: step-at-a-time against chunked kernels as rows x channels grow")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        (out / "scan_sweep.json").write_text(json.dumps(sweep()))
        return
    if args.sweep_training_segments:
        (out / "scan_training_segments_sweep.json").write_text(json.dumps(sweep_training_segments()))
        return
    if args.sweep_occupancy:
        (out / "scan_occupancy_sweep.json").write_text(json.dumps(sweep_occupancy()))
        return
    if args.sweep_paths:
        (out / "scan_paths_sweep.json").write_text(json.dumps(sweep_paths()))
        return
    if args.sweep_segments:
        (out / "scan_segments_sweep.json").write_text(json.dumps(sweep_segments()))
        return
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as e:
        print(f"mamba_ssm unavailable ({e}): no peer column for the scan")
        selective_scan_fn = None
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except ImportError as e:
        print(f"causal_conv1d unavailable ({e}): no peer column for the conv")
        causal_conv1d_fn = causal_conv1d_update = None
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except ImportError as e:
        print(f"mamba_ssm's selective_state_update unavailable ({e})")
        selective_state_update = None
    bw, exps = copy_bandwidth(), exp_rate()
    rows = []
    parts = set(args.ops.split(","))
    if "scan" in parts:
        run_scan(rows, bw, exps, selective_scan_fn)
    if "conv" in parts:
        run_conv(rows, bw, causal_conv1d_fn)
    if "decode" in parts:
        run_decode(rows, bw, selective_state_update, causal_conv1d_update)
    md = table(rows, bw, exps, "mamba_ssm 2.3.2.post1, causal_conv1d 1.7.0 (CUDA, sm_90)")
    (out / "bench_scan.json").write_text(json.dumps({"rows": rows, "copy_bw": bw, "exp_rate": exps,
                                                     "tuning": dataclasses.asdict(tuning.current("scan"))},
                                                    indent=1))
    (out / "bench_scan.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
