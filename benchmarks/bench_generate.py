"""Generation on one GPU: samba-1.7b against Llama-3-1.6B, from samba-lm and from Hugging Face
transformers, in one process; random weights, bf16.

    python benchmarks/bench_generate.py --out results/                       # every section
    python benchmarks/bench_generate.py --sections decode,ttft --out results/

Sections (--sections, comma-separated):
  prefill   128K tokens per measurement, batch = 128K / length, lengths 4K to 128K: generate's prefill
            path (`samba_lm.prefill`, default chunks), one full forward of samba-1.7b for comparison,
            and HF's LlamaForCausalLM forward (sdpa) filling its cache. tokens/s and peak memory.
  decode    batch 1, 16 and 64 after a 4K prompt: tokens/s of the decode loop as a user gets it (the
            engine's generator: captured step, a read of the device every 16 tokens); HF with its
            DynamicCache, eagerly, and with --hf-compile its static cache under torch.compile.
  protocol  the paper's: batch 16 generating 64K tokens after a 128-token prompt, for samba-1.7b and
            our Llama-3 (whose cache grows): tokens/s over the whole run, step time at 4K, 16K, 64K.
  ttft      time to first token for a 32K prompt at batch 1.
  memory    samba-1.7b decode peak memory after 4K and after 1M tokens of context, batch 1.
  sambay    phi4-mini-flash (SambaY at Phi-4-mini-flash-reasoning's released shape): prefill tokens/s
            at 4K to 128K; decode at the decode batches, with the weights-plus-state bandwidth floor;
            time to first token of a 32K prompt with YOCO (the cross half runs for the last position
            only) and without (the same stack over every position); decode peak memory against context.
Writes bench_generate.json and bench_generate.md under --out; prints the table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import copy_bandwidth  # noqa: E402

from samba_lm import DecodeEngine, SambaConfig, SambaLM, prefill  # noqa: E402

K = 1024
PREFILL_TOKENS = 128 * K
LENGTHS = [4 * K, 16 * K, 32 * K, 64 * K, 128 * K]
VOCAB = 50304


def ours(preset: str) -> SambaLM:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = SambaLM(SambaConfig.from_preset(preset))
    return model.to(torch.bfloat16).eval()


def hf_llama():
    """transformers' LlamaForCausalLM at our llama3-1.6b's shape (the paper's Llama-3 1.6B)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=64, max_position_embeddings=2 * 128 * K,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16).eval()


def timed(fn, repeat=1):
    """(seconds of the fastest of `repeat` runs after one warm-up, peak GiB allocated during them)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, torch.cuda.max_memory_allocated() / 2**30


def tokens(batch, length):
    return torch.randint(0, VOCAB, (batch, length), device="cuda")


# ------------------------------------------------------------------ sections
@torch.inference_mode()
def section_prefill(models, rows):
    for L in LENGTHS:
        B = PREFILL_TOKENS // L
        ids = tokens(B, L)
        runs = {"samba-1.7b, generate's prefill": lambda: prefill(models["samba"], ids, models["samba"].init_state(B)),
                "samba-1.7b, one full forward": lambda: models["samba"](ids, logits_to_keep=1),
                "llama3-1.6b (samba-lm), generate's prefill":
                    lambda: prefill(models["llama"], ids, models["llama"].init_state(B, capacity=L))}
        if "hf" in models:
            runs["HF LlamaForCausalLM (sdpa)"] = lambda: models["hf"](ids, use_cache=True, logits_to_keep=1)
        for name, fn in runs.items():
            seconds, peak = timed(fn)
            rows.append(dict(section="prefill", model=name, length=L, batch=B, tok_s=B * L / seconds, peak_gib=peak))
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()


def engine_rate(model, batch, prompt_len, steps, capacity=None, bandwidth=None):
    """tokens/s of the engine's generator past its capture, the peak memory while decoding, and with
    `bandwidth` the step's floor in seconds (`decode_floor_s`, at the timed steps' start; else None)."""
    engine = DecodeEngine(model, batch, capacity=capacity)
    stream = engine.generate_stream(tokens(batch, prompt_len), max_new_tokens=steps + 64)
    for _ in range(33):  # prefill, the eager first step, the capture, two blocks
        next(stream)
    floor = decode_floor_s(model, engine.state, bandwidth) if bandwidth else None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        next(stream)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0), torch.cuda.max_memory_allocated() / 2**30, floor


@torch.inference_mode()
def hf_eager_rate(model, batch, prompt_len, steps):
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(tokens(batch, prompt_len), past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(3):
        tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0), torch.cuda.max_memory_allocated() / 2**30


@torch.inference_mode()
def hf_static_compiled_rate(model, batch, prompt_len, steps):
    """HF generate with its static cache (transformers compiles the decoding forward for it): the decode
    rate from two runs of different lengths, so that the prefill cancels."""
    ids = tokens(batch, prompt_len)

    def run(n):
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static")
        torch.cuda.synchronize()

    run(steps)  # compiles
    t0 = time.perf_counter()
    run(16)
    short = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run(16 + steps)
    long = time.perf_counter() - t0
    return batch * steps / (long - short), torch.cuda.max_memory_allocated() / 2**30


def section_decode(models, rows, hf_compile, batches, prompt):
    for B in batches:
        steps = 512
        for name, model, capacity in (("samba-1.7b", models["samba"], None),
                                      ("llama3-1.6b (samba-lm)", models["llama"], prompt + steps + 128)):
            rate, peak, _ = engine_rate(model, B, prompt, steps, capacity)
            rows.append(dict(section="decode", model=name + ", CUDA graph", batch=B, prompt=prompt, tok_s=rate,
                             step_ms=1e3 * B / rate, peak_gib=peak))
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
        if "hf" in models:
            rate, peak = hf_eager_rate(models["hf"], B, prompt, 64)
            rows.append(dict(section="decode", model="HF LlamaForCausalLM, eager, DynamicCache", batch=B, prompt=prompt,
                             tok_s=rate, step_ms=1e3 * B / rate, peak_gib=peak))
            print(rows[-1], flush=True)
            if hf_compile:
                try:
                    rate, peak = hf_static_compiled_rate(models["hf"], B, prompt, 256)
                    rows.append(dict(section="decode", model="HF LlamaForCausalLM, static cache + torch.compile",
                                     batch=B, prompt=prompt, tok_s=rate, step_ms=1e3 * B / rate, peak_gib=peak))
                except Exception as e:  # reported, not fatal: the rest of the table still counts
                    rows.append(dict(section="decode", model="HF static cache + torch.compile", batch=B,
                                     error=f"{type(e).__name__}: {str(e)[:200]}"))
                print(rows[-1], flush=True)
            torch.cuda.empty_cache()


@torch.inference_mode()
def section_protocol(models, rows, new_tokens):
    """Batch 16, a 128-token prompt, `new_tokens` generated; events every 1024 tokens."""
    B, prompt = 16, 128
    for name, model in (("samba-1.7b", models["samba"]), ("llama3-1.6b (samba-lm)", models["llama"])):
        engine = DecodeEngine(model, B, capacity=prompt + new_tokens)
        torch.cuda.reset_peak_memory_stats()
        stream = engine.generate_stream(tokens(B, prompt), max_new_tokens=new_tokens)
        next(stream)
        events = []
        t0 = time.perf_counter()
        for i, _ in enumerate(stream, start=2):
            if i % K == 0:
                events.append((i, torch.cuda.Event(enable_timing=True)))
                events[-1][1].record()
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        step_ms = {}
        for (i0, e0), (i1, e1) in zip(events, events[1:]):
            step_ms[i1] = e0.elapsed_time(e1) / (i1 - i0)
        at = {f"step_ms_at_{n // K}K": step_ms.get(n, step_ms[max(step_ms)]) for n in (4 * K, 16 * K, 64 * K)
              if n <= new_tokens}
        rows.append(dict(section="protocol", model=name, batch=B, prompt=prompt, new_tokens=new_tokens,
                         tok_s=B * (new_tokens - 1) / total, peak_gib=torch.cuda.max_memory_allocated() / 2**30, **at))
        print(rows[-1], flush=True)
        del engine, stream
        torch.cuda.empty_cache()


@torch.inference_mode()
def section_ttft(models, rows):
    L = 32 * K
    for name, model in (("samba-1.7b", models["samba"]), ("llama3-1.6b (samba-lm)", models["llama"])):
        engine = DecodeEngine(model, 1, capacity=L + 8)
        ids = tokens(1, L)
        seconds, peak = timed(lambda: next(engine.generate_stream(ids, max_new_tokens=4)), repeat=3)
        rows.append(dict(section="ttft", model=name, batch=1, prompt=L, ttft_ms=seconds * 1e3, peak_gib=peak))
        print(rows[-1], flush=True)
    if "hf" in models:
        ids = tokens(1, L)
        seconds, peak = timed(lambda: int(models["hf"](ids, use_cache=True, logits_to_keep=1).logits[0, -1].argmax()),
                              repeat=3)
        rows.append(dict(section="ttft", model="HF LlamaForCausalLM (sdpa)", batch=1, prompt=L, ttft_ms=seconds * 1e3,
                         peak_gib=peak))
        print(rows[-1], flush=True)


@torch.inference_mode()
def section_memory(models, rows):
    """Decode at batch 1 after 4K and after 1M tokens of context: peak memory of the decode steps, and
    of the whole run (the chunked prefill included)."""
    model = models["samba"]
    for context in (4 * K, 1024 * K):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        engine = DecodeEngine(model, 1)
        stream = engine.generate_stream(tokens(1, context), max_new_tokens=200)
        next(stream)
        whole_so_far = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in stream:
            pass
        decode = torch.cuda.max_memory_allocated()
        rows.append(dict(section="memory", model="samba-1.7b", batch=1, context=context, decode_peak_gib=decode / 2**30,
                         run_peak_gib=max(decode, whole_so_far) / 2**30))
        print(rows[-1], flush=True)
        del engine, stream


# ------------------------------------------------------------------ SambaY
SAMBAY = "phi4-mini-flash"


def without_yoco(model: SambaLM):
    """The same stack with YOCO's truncation off: every sub-layer runs over every position, and only
    the logits are cut to the kept ones (the baseline of the TTFT goal)."""
    model.position_wise_from = len(model.layers)
    return model


def decode_floor_s(model: SambaLM, state, bandwidth: float) -> float:
    """Seconds a decode step needs at the copy bandwidth to read the weights once (an untied input
    embedding only gathers its rows) and the state: every fixed-size record whole, a growing cache
    up to its length."""
    weights = sum(p.nbytes for p in model.parameters())
    if model.lm_head is not None:
        weights -= model.embedding.weight.nbytes
    state_bytes = 0
    for record in state.layers:
        if record is None:
            continue
        tensors = [getattr(record, f.name) for f in dataclasses.fields(record)
                   if isinstance(getattr(record, f.name), torch.Tensor)]
        share = min(1.0, record.length / record.pos.shape[1]) if getattr(record, "grows", False) else 1.0
        state_bytes += share * sum(t.nbytes for t in tensors)
    return (weights + state_bytes) / bandwidth


@torch.inference_mode()
def section_sambay(models, rows, batches, prompt, bandwidth):
    model = models["sambay"]
    for L in LENGTHS:
        B = PREFILL_TOKENS // L
        ids = tokens(B, L)
        seconds, peak = timed(lambda: prefill(model, ids, model.init_state(B, capacity=L)))
        rows.append(dict(section="prefill", model=f"{SAMBAY}, generate's prefill", length=L, batch=B,
                         tok_s=B * L / seconds, peak_gib=peak))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    for B in batches:
        steps = 512
        rate, peak, floor = engine_rate(model, B, prompt, steps, prompt + steps + 128, bandwidth)
        rows.append(dict(section="decode", model=f"{SAMBAY}, CUDA graph", batch=B, prompt=prompt, tok_s=rate,
                         step_ms=1e3 * B / rate, peak_gib=peak, floor_ms=floor * 1e3, over_floor=(B / rate) / floor))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    L = 32 * K
    ids = tokens(1, L)
    for name, stack in ((f"{SAMBAY}, YOCO", model), (f"{SAMBAY}, without YOCO", without_yoco(ours(SAMBAY)))):
        engine = DecodeEngine(stack, 1, capacity=L + 8)
        seconds, peak = timed(lambda e=engine: next(e.generate_stream(ids, max_new_tokens=4)), repeat=3)
        rows.append(dict(section="ttft", model=name, batch=1, prompt=L, ttft_ms=seconds * 1e3, peak_gib=peak))
        print(rows[-1], flush=True)
        del engine
        torch.cuda.empty_cache()
    for context in (4 * K, 32 * K, 128 * K):
        torch.cuda.empty_cache()
        engine = DecodeEngine(model, 1, capacity=context + 256)
        stream = engine.generate_stream(tokens(1, context), max_new_tokens=200)
        next(stream)
        torch.cuda.reset_peak_memory_stats()
        for _ in stream:
            pass
        rows.append(dict(section="memory", model=SAMBAY, batch=1, context=context,
                         decode_peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                         state_gib=engine.state.nbytes() / 2**30))
        print(rows[-1], flush=True)
        del engine, stream


# ------------------------------------------------------------------ table
def table(rows, meta) -> str:
    out = [f"# Generation: {meta['device']}, {meta['date']}", "",
           f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}; bf16, random "
           f"weights; measured copy bandwidth {meta['copy_tb_s']:.2f} TB/s.", ""]
    sections = {
        "prefill": ("| model | length | batch | tokens/s | peak GiB |", "|---|---|---|---|---|",
                    lambda r: f"| {r['model']} | {r['length'] // K}K | {r['batch']} | {r['tok_s']:,.0f} | {r['peak_gib']:.1f} |"),
        "decode": ("| model | prompt | batch | tokens/s | ms/step | floor ms/step (x) | peak GiB |",
                   "|---|---|---|---|---|---|---|",
                   lambda r: (f"| {r['model']} | {r['prompt'] // K}K | {r['batch']} | {r['tok_s']:,.0f} | "
                              f"{r['step_ms']:.2f} | " + (f"{r['floor_ms']:.2f} ({r['over_floor']:.2f}x)" if "floor_ms" in r
                                                          else "-") + f" | {r['peak_gib']:.1f} |") if "error" not in r else
                   f"| {r['model']} | {r['prompt'] // K}K | {r['batch']} | {r['error']} | | | |"),
        "protocol": ("| model | batch | new tokens | tokens/s over the run | ms/step at 4K / 16K / 64K | peak GiB |",
                     "|---|---|---|---|---|---|",
                     lambda r: (f"| {r['model']} | {r['batch']} | {r['new_tokens']:,} | {r['tok_s']:,.0f} | "
                                + " / ".join(f"{r[k]:.2f}" for k in r if k.startswith("step_ms_at"))
                                + f" | {r['peak_gib']:.1f} |")),
        "ttft": ("| model | prompt | time to first token, ms | peak GiB |", "|---|---|---|---|",
                 lambda r: f"| {r['model']} | {r['prompt'] // K}K | {r['ttft_ms']:.0f} | {r['peak_gib']:.1f} |"),
        "memory": ("| model | context | decode peak GiB | run peak GiB | state GiB |", "|---|---|---|---|---|",
                   lambda r: f"| {r['model']} | {r['context'] // K}K | {r['decode_peak_gib']:.2f} | "
                             + (f"{r['run_peak_gib']:.2f}" if "run_peak_gib" in r else "-")
                             + (f" | {r['state_gib']:.2f} |" if "state_gib" in r else " | - |")),
    }
    for name, (head, rule, line) in sections.items():
        chosen = [r for r in rows if r["section"] == name]
        if chosen:
            out += [f"## {name}", "", head, rule] + [line(r) for r in chosen] + [""]
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for the JSON and markdown results")
    p.add_argument("--sections", default="prefill,decode,protocol,ttft,memory,sambay",
                   help="comma-separated sections to run (see above)")
    p.add_argument("--protocol-tokens", type=int, default=64 * K, help="tokens generated in the paper's protocol")
    p.add_argument("--decode-batches", default="1,16,64", help="comma-separated batch sizes of the decode section")
    p.add_argument("--decode-prompt", type=int, default=4 * K, help="prompt tokens before the decode section's steps")
    p.add_argument("--hf-compile", action="store_true", help="also time HF's static cache under torch.compile")
    p.add_argument("--no-hf", action="store_true", help="leave Hugging Face transformers out")
    args = p.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - {"prefill", "decode", "protocol", "ttft", "memory", "sambay"}
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import transformers
        version = transformers.__version__
    except ImportError:
        version, args.no_hf = "absent", True
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=triton.__version__, transformers=version, copy_tb_s=copy_bandwidth() / 1e12,
                command=" ".join(sys.argv))
    models = {"samba": ours("samba-1.7b"), "llama": ours("llama3-1.6b")}
    if "sambay" in sections:
        models["sambay"] = ours(SAMBAY)
    if not args.no_hf:
        models["hf"] = hf_llama()
    meta["parameters"] = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    print(meta, flush=True)
    rows = []
    batches = [int(b) for b in args.decode_batches.split(",")]
    run = dict(prefill=lambda: section_prefill(models, rows),
               decode=lambda: section_decode(models, rows, args.hf_compile, batches, args.decode_prompt),
               protocol=lambda: section_protocol(models, rows, args.protocol_tokens),
               ttft=lambda: section_ttft(models, rows), memory=lambda: section_memory(models, rows),
               sambay=lambda: section_sambay(models, rows, batches, args.decode_prompt, meta["copy_tb_s"] * 1e12))
    for name in sections:
        run[name]()
        (out / "bench_generate.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = table(rows, meta)
    (out / "bench_generate.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
