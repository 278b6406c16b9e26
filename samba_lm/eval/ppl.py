"""`samba-lm eval ppl`: perplexity against context length, streaming long documents through the state.

A document of any length goes through `model(chunk, state=state)` chunk by chunk, which equals one full
forward (the state invariant), so memory does not grow with its length: the state is constant for
Samba's Mamba and SWA layers (full-attention baselines keep a growing cache), the chunk's losses come
from `model(chunk, state=state, labels=...)` (`ops.linear_cross_entropy`: at most 2**26 float32 logits
at a time whatever the chunk size, then only the chunk's per-position losses), and only running sums
are kept. The NLL of position p is that of token p given tokens 0..p-1 (token 0 has no prediction).
Two views come from one pass:
- per bucket of position, 0-1K, 1K-2K, 2K-4K, ... doubling (K = 1024): mean NLL and perplexity;
- the paper's prefix average (PAPER.md, "averages over all tokens of the prefix"): PPL at length N =
  exp(mean NLL over positions 1..N-1 of the first N tokens), a cumulative mean recorded as the stream
  passes each requested N.
Several documents are aggregated token-weighted; a document shorter than N does not count for N.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.sources import ON_BAD_FILE
from ..loading import load_for_inference, resolve_device
from ..options import DEVICE_HELP, ListOption, check_out_dir, parse_count
from .documents import iter_long_documents
from .record import pyplot, run_record, write_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

K = 1024
# A newline after a non-space character: the byte-level pre-tokenizer of this project's BPE (GPT-2 regex,
# no prefix space) splits there anyway, so pieces cut there encode to exactly the ids of the whole text.
PIECE_CUT = re.compile(r"(?<=\S)\n")


@dataclass
class NLLSums:
    """Running sums of one document: O(buckets + lengths) numbers, whatever its length."""

    tokens: int  # the document's length
    bucket_sum: list[float]  # bucket b: sum of NLL over positions bucket_edges(tokens)[b] <= p < [b + 1]
    bucket_count: list[int]
    prefix_sum: dict[int, float]  # N -> sum of NLL over positions 1..N-1, for each requested N <= tokens


def bucket_edges(n_tokens: int) -> list[int]:
    """[0, 1K, 2K, 4K, ...] up to the first edge >= n_tokens."""
    edges = [0, K]
    while edges[-1] < n_tokens:
        edges.append(2 * edges[-1])
    return edges


@torch.no_grad()
def stream_nll(model, ids, chunk_size: int = 2048, lengths=(), device=None, progress: bool = True) -> NLLSums:
    """Stream one document (1-D token ids) through the model and sum the next-token NLL per bucket of
    position and up to each prefix length in `lengths`. `device`: run there (moves the model); by
    default where the model is. Cross-entropy in float32 (float64 for a float64 model), sums in float64."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.numel() < 2 or ids.is_floating_point():
        raise ValueError(f"ids must be 1-D integer token ids, at least 2 of them, got {ids.dtype} {tuple(ids.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in lengths):
        raise ValueError(f"lengths must be ints >= 2 (a prefix of N tokens holds N-1 predictions), got {list(lengths)}")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    n = ids.numel()
    edges = torch.tensor(bucket_edges(n)[1:-1], device=device)
    sums = torch.zeros(edges.numel() + 1, dtype=torch.float64, device=device)
    counts = torch.zeros(edges.numel() + 1, dtype=torch.long, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    wanted, prefix, next_n = sorted({N for N in lengths if N <= n}), {}, 0
    state = model.init_state(1, device=device)
    with tqdm(total=n - 1, unit="tok", unit_scale=True, disable=not progress, desc="streaming") as bar:
        for start in range(0, n - 1, chunk_size):
            end = min(start + chunk_size, n - 1)  # feed tokens start..end-1, predict tokens start+1..end
            chunk = ids[start:end + 1].to(device=device, dtype=torch.long)
            # The head and its loss in pieces of tokens: never the chunk's full [chunk_size, vocab] logits.
            nll = model(chunk[None, :-1], state=state, labels=chunk[None, 1:]).losses[0].double()
            bucket = torch.bucketize(torch.arange(start + 1, end + 1, device=device), edges, right=True)
            sums.index_add_(0, bucket, nll)
            counts += torch.bincount(bucket, minlength=counts.numel())
            while next_n < len(wanted) and wanted[next_n] - 1 <= end:  # position N-1 is in this chunk
                N = wanted[next_n]
                prefix[N] = total + nll[:N - 1 - start].sum()
                next_n += 1
            total += nll.sum()
            bar.update(end - start)
    return NLLSums(n, sums.tolist(), counts.tolist(), {N: float(v) for N, v in prefix.items()})


def summarize(docs: list[NLLSums], lengths) -> dict:
    """Mean NLL and perplexity per bucket and per prefix length, token-weighted over `docs`; every
    entry says how many predictions (and, for prefixes, documents) it averages."""
    longest = max(d.tokens for d in docs)
    edges = bucket_edges(longest)
    buckets = []
    for b in range(len(edges) - 1):
        count = sum(d.bucket_count[b] for d in docs if b < len(d.bucket_count))
        if count:
            nll = sum(d.bucket_sum[b] for d in docs if b < len(d.bucket_sum)) / count
            buckets.append({"bucket": f"{_size(edges[b])}-{_size(edges[b + 1])}", "start": edges[b],
                            "end": edges[b + 1], "tokens": count, **_mean(nll)})
    prefix = []
    for N in lengths:
        reached = [d.prefix_sum[N] for d in docs if N in d.prefix_sum]
        nll = sum(reached) / (len(reached) * (N - 1)) if reached else None
        prefix.append({"length": N, "documents": len(reached), "tokens": len(reached) * (N - 1), **_mean(nll)})
    predicted = sum(d.tokens - 1 for d in docs)
    overall = sum(sum(d.bucket_sum) for d in docs) / predicted
    return {"tokens": sum(d.tokens for d in docs), "predicted": predicted, **_mean(overall),
            "buckets": buckets, "prefix": prefix}


def _mean(nll):
    return {"nll": nll, "ppl": math.exp(nll) if nll is not None else None}


def _size(n: int) -> str:
    return f"{n // K**2}M" if n and n % K**2 == 0 else f"{n // K}K" if n and n % K == 0 else str(n)


def encode_long(tokenizer, text: str, max_tokens: int | None = None, piece_chars: int = 1 << 16) -> torch.Tensor:
    """Token ids (int32) of a long text, encoded in pieces of about `piece_chars` cut at PIECE_CUT, 16 at
    a time (in parallel), up to `max_tokens`: one encode of a 1.6M-token text holds about 1 GB."""
    pieces, start = [], 0
    while start < len(text):
        cut = PIECE_CUT.search(text, start + piece_chars)
        end = cut.start() if cut else len(text)
        pieces.append(text[start:end])
        start = end
    ids, count = [torch.zeros(0, dtype=torch.int32)], 0
    for i in range(0, len(pieces), 16):
        batch = [torch.tensor(e.ids, dtype=torch.int32) for e in tokenizer.encode_batch(pieces[i:i + 16])]
        ids += batch
        count += sum(map(len, batch))
        if max_tokens is not None and count >= max_tokens:
            break
    return torch.cat(ids)[:max_tokens]


def check_lengths(lengths) -> list[int]:
    """--lengths sorted, without repeats; each >= 2, since a prefix of N tokens holds N-1 predictions."""
    short = [n for n in lengths if n < 2]
    if short:
        raise ValueError(f"--lengths: {short[0]} is not a prefix length: give token counts >= 2, e.g. 1K,4K,16K,1M")
    return sorted(set(lengths))


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="a saved model, a training checkpoint or a run directory")
    parser.add_argument("--source", default="shakespeare",
                        help="'shakespeare' (the works as one document), 'austen' (six novels; "
                             "'austen:DIR' for an unpacked r-cran-janeaustenr), or a text file or directory")
    parser.add_argument("--on-bad-file", default="skip", choices=ON_BAD_FILE,
                        help="a file that is not UTF-8 text: skip it with a warning, or stop with an error")
    parser.add_argument("--max-tokens", type=int, help="truncate each document to this many tokens (default: no limit)")
    parser.add_argument("--chunk-size", type=int, default=2048, help="tokens per forward call")
    parser.add_argument("--lengths", action=ListOption, item=parse_count, metavar="N,N,...",
                        help="prefix lengths for the prefix-average perplexity, e.g. 4K,16K,1M "
                             "(default: 1K, 2K, 4K, ... up to the longest document)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="weights and activations (the Mamba state stays fp32); bfloat16 is the fast one on GPUs")
    parser.add_argument("--out", default="eval/ppl", help="directory for ppl.json and ppl.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> dict:
    """Evaluate, write `out/ppl.json` (+ `out/ppl.png` with matplotlib), print a table, return the payload."""
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2 (a document needs 2 tokens for one prediction), got {args.max_tokens}")
    lengths = check_lengths(args.lengths) if args.lengths else None
    check_out_dir(args.out, "--out")
    texts = iter_long_documents(args.source, args.on_bad_file)  # a missing source fails here, at once
    device = resolve_device(args.device)
    model, tokenizer = load_for_inference(args.model, device)
    if tokenizer is None:
        raise ValueError(f"--model: no tokenizer.json beside {args.model}, so the documents cannot be tokenized")
    model = model.to(DTYPES[args.dtype])

    documents = []
    for name, text in texts:
        ids = encode_long(tokenizer, text, args.max_tokens)
        if len(ids) < 2:
            print(f"skipping {name}: fewer than 2 tokens")
            continue
        documents.append((name, ids))
    if not documents:
        raise ValueError(f"--source {args.source}: no document has the 2 tokens one prediction needs")
    longest = max(len(ids) for _, ids in documents)
    lengths = lengths or [edge for edge in bucket_edges(longest)[1:] if edge <= longest]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started, results = time.perf_counter(), []
    for name, ids in documents:
        print(f"{name}: {len(ids):,} tokens")
        results.append(stream_nll(model, ids, args.chunk_size, lengths, progress=not args.no_progress))
    seconds = time.perf_counter() - started

    predicted = sum(r.tokens - 1 for r in results)
    payload = {
        "source": str(args.source), "chunk_size": args.chunk_size, "max_tokens": args.max_tokens,
        "lengths": lengths, "device": str(device), "dtype": args.dtype, "seconds": round(seconds, 2),
        "tokens_per_second": round(predicted / seconds, 1), **_peak_memory(device),
        "aggregate": summarize(results, lengths),
        "documents": [{"name": name, **summarize([r], lengths)} for (name, _), r in zip(documents, results)],
        "run_record": run_record(model, args.model, getattr(args, "argv", None)),
    }
    out = Path(args.out)
    write_json(out / "ppl.json", payload)
    _print_table(payload)
    png = plot(payload, out / "ppl.png")
    print(f"wrote {out / 'ppl.json'}" + (f" and {png}" if png else ""))
    return payload


def _peak_memory(device) -> dict:
    """The process's peak: GPU memory allocated on CUDA, resident memory (RSS) on CPUs."""
    if device.type == "cuda":
        return {"peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    import resource  # POSIX

    return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _print_table(payload):
    agg = payload["aggregate"]
    print(f"{len(payload['documents'])} document(s), {agg['tokens']:,} tokens, "
          f"{payload['tokens_per_second']:,.0f} tokens/s; all positions: ppl {agg['ppl']:.3f}; peak memory "
          + ", ".join(f"{k[5:]} {v:,.0f}" for k, v in payload.items() if k.startswith("peak_")))
    print(f"{'positions':>12} {'tokens':>12} {'ppl':>10}   {'prefix N':>9} {'docs':>5} {'ppl':>10}")
    for i in range(max(len(agg["buckets"]), len(agg["prefix"]))):
        left = right = ""
        if i < len(agg["buckets"]):
            b = agg["buckets"][i]
            left = f"{b['bucket']:>12} {b['tokens']:>12,} {b['ppl']:>10.3f}"
        if i < len(agg["prefix"]):
            p = agg["prefix"][i]
            ppl = f"{p['ppl']:.3f}" if p["ppl"] is not None else "-"
            right = f"{_size(p['length']):>9} {p['documents']:>5} {ppl:>10}"
        print(f"{left:<36}   {right}")


def plot(payload: dict, png_path) -> Path | None:
    """Perplexity per bucket (at the bucket's end) on a log-2 axis: one line per document, the
    aggregate, and the aggregate prefix average (at N). Needs matplotlib; None without it."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    docs = payload["documents"]
    for doc in docs:  # a legend of more than ten documents would hide the plot
        ax.plot(*_bucket_curve(doc), marker=".", lw=1, alpha=0.7, label=doc["name"] if len(docs) <= 10 else None)
    ax.plot(*_bucket_curve(payload["aggregate"]), "o-", color="black", lw=2.5, label="all documents, per bucket")
    prefix = [(p["length"], p["ppl"]) for p in payload["aggregate"]["prefix"] if p["ppl"] is not None]
    if prefix:
        ax.plot(*zip(*prefix), "s--", color="tab:gray", lw=1.5, label="all documents, prefix average at N")
    ends = sorted({b["end"] for b in payload["aggregate"]["buckets"]} | {n for n, _ in prefix})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ends, [_size(e) for e in ends], fontsize=8)
    ax.set_xlabel("position in the document (end of the bucket), or prefix length N")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{payload['run_record']['model_path']} on {payload['source']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def _bucket_curve(entry):
    return [b["end"] for b in entry["buckets"]], [b["ppl"] for b in entry["buckets"]]
