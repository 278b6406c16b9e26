"""Training throughput on one GPU, in one process: samba-lm's own training step for samba-421m,
llama2-438m, mamba-432m and samba-1.7b, and Hugging Face transformers' LlamaForCausalLM at the
llama2-438m shape, each eagerly and compiled.

    python benchmarks/bench_train.py --out results/bench_train.json               # the whole table
    python benchmarks/bench_train.py --models samba-1.7b --modes eager,compiled --out results/1.7b.json
    python benchmarks/bench_train.py --device cpu --models tiny --modes eager \\
        --seq-len 64 --micro-batch 2 --steps 2 --warmup 1                          # CPU smoke test

samba-lm entries go through the trainer's own code: `trainer.build_model`, `distributed.parallelize`
(compiled: every sub-layer under torch.compile, as `samba-lm train --compile` does), `optim.build_optimizer` with
TrainConfig's defaults, `trainer._autocast` (bf16 autocast with fp32 master weights on CUDA, fp32 on a
CPU), the learning-rate schedule, and `trainer.train_step` itself. hf-llama is `LlamaForCausalLM` (sdpa)
at llama2-438m's shape: the same autocast, fused AdamW with the same hyperparameters, forward with
labels, backward, clip, step; compiled, the whole model under torch.compile. The data: seeded random
tokens, the same for every entry of one vocabulary.

Per entry: --warmup steps, then --steps timed steps, the median. Steps run as the trainer runs them:
on a GPU each step's loss is read once the next step is queued, and a step's time runs from the
previous step's read (or its own start, if later) to its own read:
tokens/s of the global batch (--batch-size sequences of --seq-len tokens), model TFLOP/s
(3 x `samba_lm.flops.flops_per_token`; recomputation under --activation-checkpointing not counted),
MFU against the dense matmul rate measured in the same run (bf16 on a GPU, fp32 on a CPU), peak memory
over the timed steps (what stays allocated included) and the mean loss of the timed steps. A compiled
entry also reports the largest |loss - eager's loss| over all its steps, warmup included: both start
from the same initialisation and see the same batches, so this checks that `train --compile` trains
like eager. An entry that fails (out of memory, a compile error) is recorded with its error and the
run goes on. Writes --out (JSON, after every entry) and the markdown table beside it (.md); prints
the table last.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samba_lm import ops  # noqa: E402
from samba_lm.config import PRESETS, SambaConfig  # noqa: E402
from samba_lm.flops import flops_per_token  # noqa: E402
from samba_lm.options import first_line, json_object  # noqa: E402
from samba_lm.train import distributed as D  # noqa: E402
from samba_lm.train.config import TrainConfig  # noqa: E402
from samba_lm.train.optim import build_optimizer, lr_at  # noqa: E402
from samba_lm.train.trainer import HostCopy, _autocast, batch_plan, build_model, train_step  # noqa: E402

HF = "hf-llama"
HF_SHAPE = "llama2-438m"  # the preset whose shape hf-llama takes
DEFAULT_MODELS = f"samba-421m,llama2-438m,mamba-432m,samba-1.7b,{HF}"
MODES = ("eager", "compiled")


EOS = 0  # the EOS id of --pack documents' random documents


class RandomTokens:
    """The trainer's loader interface: next_batch(n) -> [n, seq_len + 1] int64 CPU tokens, seeded. With
    doc_length, EOS ends a document after each token with probability 1 / doc_length (else it is
    avoided), so that --pack documents sees documents of that mean length."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, doc_length: int = 0):
        self.vocab_size, self.seq_len, self.doc_length = vocab_size, seq_len, doc_length
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self, n: int) -> torch.Tensor:
        if not self.doc_length:
            return torch.randint(0, self.vocab_size, (n, self.seq_len + 1), generator=self.generator)
        tokens = torch.randint(EOS + 1, self.vocab_size, (n, self.seq_len + 1), generator=self.generator)
        ends = torch.rand(tokens.shape, generator=self.generator) < 1 / self.doc_length
        return tokens.masked_fill(ends, EOS)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, n: int) -> dict:
    """FLOP/s of an n x n x n matmul, median of 7 samples of 10 (bf16 on a GPU, fp32 on a CPU: the
    dtype the training matmuls run in there)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 1
    samples = []
    for i in range(3 + 7):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        if i >= 3:
            samples.append(time.perf_counter() - t0)
    return dict(size=n, dtype=str(dtype).removeprefix("torch."), flop_s=2 * n**3 * inner / statistics.median(samples))


# ------------------------------------------------------------------ the entries
def samba_entry(name, compiled, args, env):
    """samba-lm's model, optimizer and step, built as `trainer._run` builds them. Returns (step
    function, optimizer, model config, parameters, micro, accum); the model lives in the closure."""
    cfg = TrainConfig(model=name, model_args=args.model_args, seq_len=args.seq_len, batch_size=args.batch_size,
                      micro_batch_size=micro_for(name, args), compile=compiled,
                      activation_checkpointing=args.activation_checkpointing, recompute_mamba=args.recompute_mamba,
                      device=args.device, seed=args.seed)
    model_cfg = SambaConfig.from_preset(name, **args.model_args)
    micro, accum = batch_plan(cfg, env.world_size)
    model = build_model(model_cfg, env.device, cfg.seed)
    model = D.parallelize(model, cfg.parallel, env, compile=cfg.compile, checkpoint=cfg.activation_checkpointing,
                          recompute_mamba=cfg.recompute_mamba)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, cfg.exempt_from_decay)
    autocast = _autocast(cfg, env.device)
    documents = args.pack == "documents"
    loader = RandomTokens(model_cfg.vocab_size, args.seq_len, args.seed, args.doc_length if documents else 0)
    n_params = sum(p.numel() for p in model.parameters())

    def step():
        return train_step(model, optimizer, loader, micro, accum, autocast, env, cfg.grad_clip,
                          EOS if documents else None)[0]

    return step, optimizer, model_cfg, n_params, micro, accum


def hf_llama_config(shape: SambaConfig, seq_len: int):
    from transformers import LlamaConfig

    n = len(shape.layers) // 2
    if shape.layers != ("attn", "mlp") * n:
        raise ValueError(f"{HF} takes {HF_SHAPE}'s shape, which must alternate attn and mlp; got {shape.layers}")
    return LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.d_model, intermediate_size=shape.mlp_hidden,
                       num_hidden_layers=n, num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads,
                       head_dim=shape.head_dim, max_position_embeddings=seq_len, rope_theta=shape.rope_base,
                       rms_norm_eps=shape.norm_eps, tie_word_embeddings=shape.tie_embeddings, use_cache=False,
                       attn_implementation="sdpa")


def hf_entry(compiled, args, env):
    """LlamaForCausalLM at llama2-438m's shape (--model-args apply), fp32 master weights, the
    trainer's autocast and AdamW hyperparameters (fused), the trainer's batch plan and clipping."""
    from transformers import LlamaForCausalLM

    cfg = TrainConfig(model=HF_SHAPE, model_args=args.model_args, seq_len=args.seq_len, batch_size=args.batch_size,
                      micro_batch_size=micro_for(HF, args), device=args.device, seed=args.seed)
    shape = SambaConfig.from_preset(HF_SHAPE, **args.model_args)
    micro, accum = batch_plan(cfg, env.world_size)
    torch.manual_seed(cfg.seed)
    with torch.device(env.device):
        model = LlamaForCausalLM(hf_llama_config(shape, args.seq_len))
    model.train()
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=True)
    forward = torch.compile(model) if compiled else model
    autocast = _autocast(cfg, env.device)
    loader = RandomTokens(shape.vocab_size, args.seq_len, args.seed)
    n_params = sum(p.numel() for p in model.parameters())

    def step():  # train_step's shape: accumulate the micro-batches, clip, step
        total = torch.zeros((), device=env.device)
        for block in loader.next_batch(micro * accum).split(micro):
            ids = block[:, :-1].to(env.device, non_blocking=True)
            with autocast():
                loss = forward(input_ids=ids, labels=ids).loss / accum  # HF shifts the labels itself
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return step, optimizer, shape, n_params, micro, accum


def micro_for(name: str, args) -> int:
    return args.micro_batch_for.get(name, args.micro_batch)


def run_entry(name, mode, args, env, matmul) -> dict:
    compiled, started = mode == "compiled", time.perf_counter()
    if name == HF:
        step, optimizer, model_cfg, n_params, micro, accum = hf_entry(compiled, args, env)
    else:
        step, optimizer, model_cfg, n_params, micro, accum = samba_entry(name, compiled, args, env)
    print(f"== {name} {mode}: {n_params / 1e6:.1f}M parameters, micro {micro} x accumulation {accum} x "
          f"{args.seq_len} tokens", flush=True)
    lr_cfg, total = TrainConfig(), args.warmup + args.steps  # the trainer's schedule over this many steps
    losses, times, pending, read_at = [], [], None, -math.inf

    def read(pending, read_at):  # as the trainer reads a step: once the next one is queued
        i, loss, started = pending
        losses.append(loss.get()[0])
        now = time.perf_counter()
        times.append(now - max(started, read_at))
        print(f"  step {i + 1}/{total}{' (warmup)' if i < args.warmup else ''}: {times[-1]:.3f} s, "
              f"loss {losses[-1]:.4f}", flush=True)
        return now

    for i in range(total):
        if i == args.warmup and env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        lr = lr_at(i, total, lr_cfg.lr, round(lr_cfg.warmup_fraction * total), lr_cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        loss = HostCopy(step())
        if pending is not None:
            read_at = read(pending, read_at)
        pending = i, loss, started
        if not loss.in_flight:  # a CPU step is done when it returns
            read_at, pending = read(pending, read_at), None
    if pending is not None:
        read(pending, read_at)
    if args.profile:
        profile_step(step, env.device, Path(args.out).with_name(f"{Path(args.out).stem}_{name}_{mode}_profile.txt"))
    timed = times[args.warmup:]
    seconds = statistics.median(timed)
    tokens = args.batch_size * args.seq_len
    flops = 3 * flops_per_token(model_cfg, args.seq_len) * tokens / seconds
    return dict(model=name, mode=mode, parameters=n_params, micro_batch=micro, accumulation=accum,
                tokens_per_step=tokens, step_s=seconds, tok_s=tokens / seconds, tflop_s=flops / 1e12,
                mfu=flops / matmul["flop_s"], peak_gib=torch.cuda.max_memory_allocated(env.device) / 2**30
                if env.device.type == "cuda" else None, loss=statistics.mean(losses[args.warmup:]),
                entry_s=time.perf_counter() - started, losses=losses, step_times_s=times)


def profile_step(step, device: torch.device, path: Path):
    """One more step under torch.profiler: its kernels by GPU time, to see where a step goes, and its
    Chrome trace (.trace.json.gz beside the table: chrome://tracing or ui.perfetto.dev), to see when
    the GPU waits for the host."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=80, max_name_column_width=90) + "\n")
    trace = path.with_suffix(".trace.json.gz")
    prof.export_chrome_trace(str(trace))
    print(f"  profile: {path}, {trace}", flush=True)


def free_memory(device: torch.device):
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def loss_diff(row: dict, rows: list[dict]) -> float | None:
    """max |loss - eager's loss| over the steps both ran, for a compiled entry with an eager twin."""
    eager = [r for r in rows if r["model"] == row["model"] and r["mode"] == "eager" and "losses" in r]
    if row["mode"] == "eager" or not eager or "losses" not in row:
        return None
    return max(abs(a - b) for a, b in zip(row["losses"], eager[0]["losses"]))


# ------------------------------------------------------------------ report
def table(rows, meta) -> str:
    mm = meta["matmul"]
    out = [f"# Training step: {meta['device']}, {meta['date']}", "",
           f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}; seq {meta['seq_len']}, "
           f"{meta['batch_size']} sequences per step, median of {meta['steps']} steps after {meta['warmup']} warmup"
           + (", activation checkpointing" if meta["activation_checkpointing"] else "")
           + (", Mamba mixers recomputed" if meta.get("recompute_mamba") else "")
           + (f", packed documents of {meta['doc_length']} tokens on average, each seeing only itself"
              if meta.get("pack") == "documents" else "")
           + f"; {mm['dtype']} matmul {mm['size']}^3: {mm['flop_s'] / 1e12:.1f} TFLOP/s (MFU against it).", "",
           "| model | mode | micro x accum | tok/s | TFLOP/s | MFU | peak GiB | loss | loss diff vs eager |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['mode']} | {r['error']} | | | | | | |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        diff = f"{r['loss_diff']:.2e}" if r.get("loss_diff") is not None else "-"
        out.append(f"| {r['model']} | {r['mode']} | {r['micro_batch']} x {r['accumulation']} | {r['tok_s']:,.0f} | "
                   f"{r['tflop_s']:.3g} | {100 * r['mfu']:.1f}% | {peak} | {r['loss']:.4f} | {diff} |")
    return "\n".join(out)


def versions() -> dict:
    found = {}
    for name in ("triton", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = "absent"
    return found


def micro_overrides(text: str) -> dict:
    overrides = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: write NAME=MICRO, e.g. samba-1.7b=4")
        overrides[name.strip()] = int(value)
    return overrides


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma-separated samba-lm presets and/or {HF} (default: {DEFAULT_MODELS})")
    p.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled (default: both)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default: 4096)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step (default: 8)")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="sequences per forward; batch-size / micro-batch accumulation steps (default: 8)")
    p.add_argument("--micro-batch-for", type=micro_overrides, default="", metavar="NAME=MICRO,...",
                   help="per-model micro batches over --micro-batch, e.g. samba-1.7b=4 (4 x accumulation 2) where "
                        "its activations do not fit: on an H200 samba-1.7b at micro-batch 8 peaks at 109 GiB "
                        "(default: none)")
    p.add_argument("--recompute-mamba", action="store_true",
                   help="keep only each Mamba mixer's input for the backward and recompute the mixer there")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each sub-layer in the backward (samba-lm's per-sub-layer checkpointing; HF's "
                        "gradient_checkpointing_enable)")
    p.add_argument("--pack", default="concat", choices=["concat", "documents"],
                   help="samba-lm entries: the trainer's --pack; documents: random documents of --doc-length "
                        "tokens on average, each seeing only itself (default: concat)")
    p.add_argument("--doc-length", type=int, default=1024,
                   help="mean document length of --pack documents (default: 1024)")
    p.add_argument("--model-args", type=json_object, default={}, metavar="JSON",
                   help="SambaConfig fields over every preset, and over hf-llama's shape (llama2-438m's), e.g. "
                        """'{"d_model": 256}' for a small smoke run""")
    p.add_argument("--tuning", type=json_object, default={}, metavar="JSON",
                   help="kernel tuning over the defaults for every entry, as samba_lm.ops.tuned(**JSON) takes it, "
                        """e.g. '{"scan": {"backward_segment_programs_per_sm_above": [4, 20]}}' (default: none)""")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first; compiling happens here (default: 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the tokens (default: 0)")
    p.add_argument("--matmul-size", type=int, default=0,
                   help="n of the n^3 matmul whose rate MFU is against; 0: 8192 on a GPU, 1024 on a CPU")
    p.add_argument("--profile", action="store_true",
                   help="profile one extra step per entry; its kernel table and Chrome trace go beside --out "
                        "(_<model>_<mode>_profile.txt, .trace.json.gz)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    p.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "bench_train.json"), metavar="PATH.json",
                   help="the JSON results; the markdown table goes beside it (default: $OUT/bench_train.json)")
    args = p.parse_args()
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in MODES if m in args.modes.split(",")]  # eager first: compiled entries compare with it
    unknown = [m for m in models if m not in PRESETS and m != HF]
    if unknown:
        p.error(f"--models: unknown {unknown}; valid: {', '.join(PRESETS)}, {HF}")
    if not modes or set(args.modes.split(",")) - set(MODES):
        p.error(f"--modes: comma-separated {', '.join(MODES)}, got {args.modes!r}")
    if min(args.seq_len, args.batch_size, args.micro_batch, args.steps, args.doc_length) < 1 or args.warmup < 0:
        p.error("--seq-len, --batch-size, --micro-batch, --steps and --doc-length must be positive, --warmup >= 0")

    env = D.setup(args.device)
    if env.distributed:
        p.error("one process: run it without torchrun")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    found = versions()
    if HF in models and found["transformers"] == "absent":
        print(f"transformers is not installed: {HF} is skipped", flush=True)
    cuda = env.device.type == "cuda"
    matmul = matmul_rate(env.device, args.matmul_size or (8192 if cuda else 1024))
    device = (torch.cuda.get_device_name(env.device) if cuda else
              f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    meta = dict(device=device, date=datetime.date.today().isoformat(),
                torch=torch.__version__, **found, matmul=matmul, seq_len=args.seq_len, batch_size=args.batch_size,
                warmup=args.warmup, steps=args.steps, activation_checkpointing=args.activation_checkpointing,
                recompute_mamba=args.recompute_mamba, pack=args.pack, tuning=args.tuning,
                doc_length=args.doc_length if args.pack == "documents" else None, loss_diff_steps=args.warmup + args.steps, command=" ".join(sys.argv))
    print(json.dumps(meta), flush=True)

    rows = []
    for name in models:
        for mode in modes:
            if name == HF and found["transformers"] == "absent":
                rows.append(dict(model=name, mode=mode, error="skipped: transformers is not installed"))
                continue
            try:
                with ops.tuned(**args.tuning):  # autograd's thread reads the forward's tuning (ctx.tuning)
                    row = run_entry(name, mode, args, env, matmul)
            except Exception as e:  # recorded, not fatal: the other entries still count
                row = dict(model=name, mode=mode, error=f"{type(e).__name__}: {first_line(e)[:200]}")
            free_memory(env.device)  # after the except: its traceback held the entry's tensors
            row["loss_diff"] = loss_diff(row, rows)
            rows.append(row)
            shown = {k: v for k, v in row.items() if k not in ("losses", "step_times_s")}
            print(json.dumps(shown), flush=True)
            out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    md = table(rows, meta)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
