"""`samba-lm serve` under load: concurrent streaming clients on loopback, measured from the client side.

    python benchmarks/bench_serve.py --preset samba-1.7b --out results/          # random weights, bf16
    python benchmarks/bench_serve.py --model runs/x/model --concurrency 1,16,64
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000                  # a server already running

Without --url the server runs in a child process (uvicorn, and the model and scheduler in it or, with
--engine-process, the default on CUDA as for `samba-lm serve`, in an engine process of its own), so
that the clients, asyncio + httpx in this process (or spread over --client-processes processes that
start together at a barrier), do not share its interpreter lock. Run it once with --engine-process
and once with --no-engine-process (each with its own --out) to compare the two; the JSON's meta
records which ran. --api-processes N puts N HTTP processes in front of the engine process, as `samba-lm
serve --api-processes N` does (recorded too). For each concurrency C
in --concurrency: a warm-up round (C requests of 16 tokens: it captures the decode graphs), then C
clients each sending --requests-per-client streaming requests one after another, every one
--prompt-tokens random token ids and exactly --max-tokens generated tokens (greedy, ignore_eos).
Measured: aggregate generated tokens/s and requests/s over the round, time to first token (request
sent -> first text chunk) and inter-token latency (gaps between text chunks; a server that falls
behind sends several tokens per chunk, reported as tokens/chunk) at p50 and p99.

Then, with a local model (--model or --preset), generate()'s inter-token latency for the same prompt
at batch 1: streaming every token as the server must (sync_every=1) and at generate's default
(sync_every=16, tokens read in blocks: the mean step). The issue's goal: at one client, the server's
ITL within 10% of generate's.

A --preset gets random weights and a synthetic word-level tokenizer (token i is the word "w<i>"), so
that every generated id decodes to text and makes a chunk; speed does not depend on the weights.
Writes bench_serve.json and bench_serve.md under --out ($OUT by default).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samba_lm import SambaConfig, SambaLM, generate_stream  # noqa: E402
from samba_lm.data.tokenizer import EOS  # noqa: E402
from samba_lm.options import HelpFormatter  # noqa: E402


class Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each flag's default."""


# ----------------------------------------------------------------------------- the model and server
def synthetic_tokenizer(vocab_size: int):
    """A tokenizer for random weights: id 0 is EOS, id i the word "w<i>", decoded space-separated."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOS: 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([EOS])
    return tokenizer


def load_model(args):
    """(model, tokenizer) of --model, or of --preset with random weights."""
    from samba_lm.loading import load_for_inference, resolve_device

    device = resolve_device(args.device)
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.model:
        model, tokenizer = load_for_inference(args.model, device=device, dtype=dtype)
        if tokenizer is None:
            raise SystemExit(f"{args.model} has no tokenizer.json beside it")
        return model, tokenizer
    torch.manual_seed(0)
    with torch.device(device):
        model = SambaLM(SambaConfig.from_preset(args.preset))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return model.to(dtype).eval(), synthetic_tokenizer(model.config.vocab_size)


def engine_model(args) -> SambaLM:
    """load_model's model, in the engine process."""
    return load_model(args)[0]


def load_tokenizer(args):
    """load_model's tokenizer, without the weights (the engine process loads those)."""
    if args.model:
        from samba_lm.loading import load_tokenizer_for_generation

        return load_tokenizer_for_generation(args.model)[0]
    return synthetic_tokenizer(SambaConfig.from_preset(args.preset).vocab_size)


def run_server(args, port: int):
    """The child process: load, start the scheduler (in a thread or an engine process), serve until SIGTERM;
    with --api-processes N, `samba-lm serve --api-processes N`'s processes over the same model."""
    from samba_lm.serving.engine_process import EngineProcess
    from samba_lm.serving.scheduler import Scheduler
    from samba_lm.serving.server import build_app, serve

    options = dict(max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                   prefill_rows=args.prefill_rows, max_context=args.max_context)
    if args.api_processes > 1:
        return serve_api_processes(args, port)
    if args.engine_process:
        scheduler = EngineProcess(functools.partial(engine_model, args), **options).start()
        tokenizer, vocab_size = load_tokenizer(args), scheduler.vocab_size
    else:
        model, tokenizer = load_model(args)
        scheduler, vocab_size = Scheduler(model, **options).start(), model.config.vocab_size
    app = build_app(scheduler, tokenizer, "bench", args.max_context, vocab_size=vocab_size, grace_s=5)
    serve(app, "127.0.0.1", port, log_level="warning")


def serve_api_processes(args, port: int):
    """`samba-lm serve --api-processes N`'s parent over the same model. Its HTTP processes read the
    tokenizer from a model directory: a preset's synthetic one is written to a temporary one, with the
    preset's config.json beside it (no weights: the engine process makes them, as engine_model does)."""
    import tempfile

    from samba_lm.checkpoint import CONFIG_FILE, FORMAT
    from samba_lm.serving import api_processes

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as model_dir:
        if args.model:
            model_dir = args.model
        else:
            config = SambaConfig.from_preset(args.preset)
            (Path(model_dir) / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, **config.to_dict()}))
            load_tokenizer(args).save(str(Path(model_dir) / "tokenizer.json"))
        serve_args = argparse.Namespace(model=model_dir, host="127.0.0.1", port=port, max_batch=args.max_batch,
                                        max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                                        prefill_rows=args.prefill_rows, max_context=args.max_context, grace=5.0,
                                        model_name="bench", log_level="warning", api_processes=args.api_processes)
        api_processes.serve_api_processes(serve_args, functools.partial(engine_model, args))


def start_server(args) -> tuple[multiprocessing.Process, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Not a daemon: it may start an engine process of its own. main() stops it however the run ends.
    process = multiprocessing.get_context("spawn").Process(target=run_server, args=(args, port))
    process.start()
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + args.start_timeout
    while True:
        if not process.is_alive():
            raise SystemExit(f"the server process exited ({process.exitcode}) before it served")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.terminate()
            raise SystemExit(f"the server did not answer /health within {args.start_timeout} s")
        time.sleep(0.5)


# ----------------------------------------------------------------------------- clients
async def one_request(client, url: str, body: dict) -> dict:
    """Send one streaming request; the arrival time of each text chunk, and the tokens generated."""
    sent, arrivals, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now, chunk = time.perf_counter(), json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"the server failed: {chunk['error']}")
            if chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(now)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"sent": sent, "arrivals": arrivals, "tokens": tokens}


async def load_round(url: str, concurrency: int, per_client: int, body: dict, barrier=None) -> tuple[list[dict], float]:
    """`concurrency` clients, each sending `per_client` requests in turn; (results, wall seconds). With
    a barrier, the clients start once every process of the round has reached it."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=None) as client:
        async def one_client():
            return [await one_request(client, url, body) for _ in range(per_client)]

        if barrier is not None:
            barrier.wait()
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return [r for rs in results for r in rs], time.perf_counter() - start


def _client_process(url: str, concurrency: int, per_client: int, body: dict, barrier, queue):
    queue.put(asyncio.run(load_round(url, concurrency, per_client, body, barrier))[0])


def spread_round(url: str, concurrency: int, per_client: int, body: dict, processes: int) -> tuple[list[dict], float]:
    """load_round's clients spread over `processes` processes, so that parsing the streams is not one
    interpreter's work. They start together, at a barrier that waits for every process to have imported
    and connected; the wall time runs from there to the last chunk (perf_counter is the system's
    monotonic clock on Linux, the same in every process)."""
    context = multiprocessing.get_context("spawn")
    processes = min(processes, concurrency)
    barrier, queue = context.Barrier(processes + 1), context.Queue()
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    workers = [context.Process(target=_client_process, args=(url, n, per_client, body, barrier, queue), daemon=True)
               for n in shares]
    for w in workers:
        w.start()
    barrier.wait(timeout=300)
    start = time.perf_counter()
    results = [r for _ in workers for r in queue.get(timeout=600)]
    for w in workers:
        w.join(30)
    end = max([start] + [r["arrivals"][-1] for r in results if r["arrivals"]])
    return results, end - start


def server_steps(url: str) -> int | None:
    """The server's decode steps so far (/metrics), or None if it does not say."""
    import httpx

    from samba_lm.serving.metrics import PREFIX

    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(f"{PREFIX}_scheduler_steps_total "):
            return int(float(line.split()[1]))
    return None


def summarize(results: list[dict], wall: float, concurrency: int) -> dict:
    ttft = [r["arrivals"][0] - r["sent"] for r in results if r["arrivals"]]
    gaps = np.concatenate([np.diff(r["arrivals"]) for r in results if len(r["arrivals"]) > 1] or [np.zeros(0)])
    tokens, chunks = sum(r["tokens"] for r in results), sum(len(r["arrivals"]) for r in results)
    ms = lambda values, q: float(np.percentile(values, q) * 1e3) if len(values) else None  # noqa: E731
    return {"concurrency": concurrency, "requests": len(results), "seconds": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
            "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99), "itl_p50_ms": ms(gaps, 50),
            "itl_p99_ms": ms(gaps, 99), "itl_mean_ms": float(gaps.mean() * 1e3) if len(gaps) else None,
            "tokens_per_chunk": tokens / chunks if chunks else None}


# ----------------------------------------------------------------------------- generate() alone
def time_generate(model, prompt: list[int], max_tokens: int, sync_every: int, repeats: int) -> dict:
    """generate_stream at batch 1: time to first token and the gaps between tokens (medians over repeats)."""
    runs = []
    for _ in range(repeats + 1):  # the first warms up (graph capture, allocator)
        start, times = time.perf_counter(), []
        for _ in generate_stream(model, [prompt], max_new_tokens=max_tokens, sync_every=sync_every):
            times.append(time.perf_counter())
        runs.append((times[0] - start, np.diff(times)))
    runs = runs[1:]
    gaps = np.concatenate([g for _, g in runs])
    return {"sync_every": sync_every, "ttft_ms": float(np.median([t for t, _ in runs]) * 1e3),
            "itl_p50_ms": float(np.percentile(gaps, 50) * 1e3), "itl_p99_ms": float(np.percentile(gaps, 99) * 1e3),
            "itl_mean_ms": float(gaps.mean() * 1e3)}


# ----------------------------------------------------------------------------- report
def table(rows: list[dict], baseline: list[dict], meta: dict) -> str:
    f = lambda x, spec=".1f": "-" if x is None else format(x, spec)  # noqa: E731
    where = {True: ", the model in an engine process", False: ", the model in the server's process"}
    http = f", {meta['api_processes']} HTTP processes" if meta.get("api_processes", 1) > 1 else ""
    lines = [f"bench_serve: {meta['model']}{where.get(meta['engine_process'], '')}{http} on {meta['device']}, "
             f"{meta['dtype']}, prompt {meta['prompt_tokens']} "
             f"tokens, {meta['max_tokens']} generated per request, clients in up to {meta['client_processes']} "
             f"processes ({meta['date']})", "",
             "| clients | requests | tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
             "| tokens/chunk | server steps | tokens/step | ms/step |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {f(r['tokens_per_s'])} | "
                     f"{f(r['requests_per_s'], '.2f')} | "
                     f"{f(r['ttft_p50_ms'])} | {f(r['ttft_p99_ms'])} | {f(r['itl_p50_ms'], '.2f')} | "
                     f"{f(r['itl_p99_ms'], '.2f')} | {f(r['tokens_per_chunk'], '.2f')} | {r.get('server_steps', '-')} | "
                     f"{f(r.get('tokens_per_step'))} | {f(r.get('ms_per_step'), '.2f')} |")
    if baseline:
        lines += ["", "| generate() at batch 1 | TTFT ms | ITL p50 ms | ITL p99 ms | ITL mean ms |",
                  "|---|---:|---:|---:|---:|"]
        for b in baseline:
            lines.append(f"| sync_every={b['sync_every']} | {f(b['ttft_ms'])} | {f(b['itl_p50_ms'], '.2f')} | "
                         f"{f(b['itl_p99_ms'], '.2f')} | {f(b['itl_mean_ms'], '.2f')} |")
        one = next((r for r in rows if r["concurrency"] == 1 and r["itl_mean_ms"]), None)
        if one:  # the issue's goal: within 10% of generate's
            ratios = ", ".join(f"{one['itl_mean_ms'] / b['itl_mean_ms']:.3f}x generate's at "
                               f"sync_every={b['sync_every']}" for b in baseline)
            lines += ["", f"Server mean ITL at 1 client: {one['itl_mean_ms']:.2f} ms = {ratios}."]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--model", help="a saved model or run directory to serve (with its tokenizer.json)")
    p.add_argument("--preset", help="serve this preset with random weights instead (e.g. samba-1.7b)")
    p.add_argument("--url", help="benchmark a server already running here (e.g. http://127.0.0.1:8000) instead of "
                                 "starting one; generate() is still timed if --model or --preset is given")
    p.add_argument("--model-name", help="the model field of each request (default: none, the server's own)")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends, one after another")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of every request (random ids)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated by every request (ignore_eos)")
    p.add_argument("--client-processes", type=int, default=1,
                   help="processes the clients are spread over (started together at a barrier), so that one "
                        "interpreter parsing every stream does not bound the measurement")
    p.add_argument("--max-batch", type=int, help="the server's batch slots (default: the largest concurrency)")
    p.add_argument("--max-queue", type=int, default=256, help="the server's queue bound")
    p.add_argument("--max-context", type=int, help="the server's max context (needed for full-attention layers)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="the scheduler's prefill chunk")
    p.add_argument("--prefill-rows", type=int, default=8, help="the scheduler's short prompts prefilled together")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the server's model in an engine process of its own, as `samba-lm serve "
                        "--engine-process` does (default: as serve's, on for a CUDA device)")
    p.add_argument("--api-processes", type=int, default=1,
                   help="HTTP processes in front of the engine process, as `samba-lm serve --api-processes N` "
                        "(N > 1 needs --engine-process)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype (auto: bf16 for a preset on CUDA, else as saved / float32)")
    p.add_argument("--generate-repeats", type=int, default=3, help="timed generate() runs (after one warm-up)")
    p.add_argument("--no-generate", action="store_true", help="do not time generate()")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds to wait for the server to come up")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt's token ids")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for bench_serve.json and .md")
    args = p.parse_args(argv)
    if not (args.model or args.preset or args.url):
        p.error("give --model, --preset or --url")
    if args.model and args.preset:
        p.error("give --model or --preset, not both")
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c]
    except ValueError:
        p.error(f"--concurrency must be comma-separated ints, got {args.concurrency!r}")
    for name in ("requests_per_client", "prompt_tokens", "max_tokens", "client_processes", "api_processes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.levels or min(args.levels) < 1:
        p.error("--concurrency must list positive ints")
    args.max_batch = args.max_batch or max(args.levels)
    if args.url and args.engine_process is not None:
        p.error("--engine-process and --no-engine-process are for the server this starts, not with --url")
    if not args.url and args.engine_process is None:
        from samba_lm.loading import resolve_device

        args.engine_process = resolve_device(args.device).type == "cuda"
    if args.api_processes > 1 and (args.url or not args.engine_process):
        p.error("--api-processes N > 1 is for the server this starts, with --engine-process")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(1, 256, size=args.prompt_tokens).tolist()  # ids every vocabulary has; never EOS (0)
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.model_name:
        body["model"] = args.model_name
    meta = {"model": args.model or args.preset or args.url, "url": args.url, "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu",
            "dtype": args.dtype, "torch": torch.__version__, "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
            "max_batch": args.max_batch, "client_processes": args.client_processes,
            "engine_process": args.engine_process, "api_processes": args.api_processes,
            "command": " ".join(sys.argv)}

    process, url = (None, args.url) if args.url else start_server(args)
    rows = []
    try:
        for concurrency in args.levels:
            warm = body | {"max_tokens": min(16, args.max_tokens)}
            asyncio.run(load_round(url, concurrency, 1, warm))
            steps_before = server_steps(url)
            if args.client_processes > 1 and concurrency > 1:
                results, wall = spread_round(url, concurrency, args.requests_per_client, body, args.client_processes)
            else:
                results, wall = asyncio.run(load_round(url, concurrency, args.requests_per_client, body))
            row = summarize(results, wall, concurrency) | {"client_processes": min(args.client_processes, concurrency)}
            steps = server_steps(url) - steps_before if steps_before is not None else None
            if steps:  # the server's side: decode steps in the round, rows a step, wall time a step
                row |= {"server_steps": steps, "tokens_per_step": row["tokens"] / steps, "ms_per_step": wall / steps * 1e3}
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
            (out / "bench_serve.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    finally:
        if process is not None:
            process.terminate()  # SIGTERM: the server drains and exits
            process.join(60)

    baseline = []
    if not args.no_generate and (args.model or args.preset):
        model, _ = load_model(args)
        baseline = [time_generate(model, prompt, args.max_tokens, s, args.generate_repeats) for s in (1, 16)]
        for b in baseline:
            print(json.dumps(b), flush=True)
    (out / "bench_serve.json").write_text(json.dumps({"meta": meta, "rows": rows, "generate": baseline}, indent=1))
    md = table(rows, baseline, meta)
    (out / "bench_serve.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
