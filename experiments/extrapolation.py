"""The paper's length-extrapolation table at small scale: tiny Samba, Llama (full attention), Llama-SWA
and Mamba with equal parameter and token budgets, trained at one length on Shakespeare, then scored
at 1x, 2x, 4x, 16x and 64x that length (perplexity averaged over all tokens of the prefix, as the
paper's SlimPajama table; PAPER.md, "Headline results").

    python experiments/extrapolation.py --out runs/extrapolation          # about 30 minutes, 2 CPU cores

Writes results.json (every model's config, weights hash, parameters, tokens, the perplexity table),
results.md (the table) and extrapolation.png into --out. Each model trains in its own run directory
(--out/<name>); a finished run is reused, so an interrupted experiment continues where it stopped.
The Samba and SWA windows are half the training length, as in the paper (4K length, 2K window).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import samba_lm  # noqa: E402
from samba_lm.loading import resolve_device  # noqa: E402
from samba_lm.data import TokenShards, build_shards  # noqa: E402
from samba_lm.eval.record import pyplot, run_record, write_json  # noqa: E402
from samba_lm.eval.ppl import stream_nll, summarize  # noqa: E402
from samba_lm.train import TrainConfig, train  # noqa: E402

from experiments.matched import PATTERNS, count_params, matched_args  # noqa: E402

MULTIPLES = (1, 2, 4, 16, 64)


def prefix_ppl(model, docs: torch.Tensor, lengths: list[int], chunk_size: int) -> dict[int, float]:
    """Perplexity of the first n tokens (averaged over all of them), over the documents, for every n."""
    sums = [stream_nll(model, doc, chunk_size=chunk_size, lengths=lengths, progress=False) for doc in docs]
    return {entry["length"]: entry["ppl"] for entry in summarize(sums, lengths)["prefix"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/extrapolation")
    p.add_argument("--seq-len", type=int, default=128, help="training length (the window is half of it)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="Samba blocks (mamba, mlp, swa, mlp); others match its size")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--eval-docs", type=int, default=4, help="validation stretches of 64x the training length")
    p.add_argument("--models", default=",".join(PATTERNS))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    args = p.parse_args()
    device = resolve_device(args.device)
    out = Path(args.out)
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(PATTERNS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {list(PATTERNS)}")
    data = out / "data"
    if not (data / "index.json").is_file():
        build_shards("shakespeare", data, vocab_size=args.vocab_size)
    shards = TokenShards(data)
    lengths = [m * args.seq_len for m in MULTIPLES]
    val = shards.split("val")
    n_docs = min(args.eval_docs, len(val) // lengths[-1])
    if n_docs < 1:
        raise SystemExit(f"the validation split ({len(val)} tokens) is shorter than 64 x --seq-len")
    docs = torch.from_numpy(val.read(0, n_docs * lengths[-1]).astype("int64")).view(n_docs, lengths[-1])

    results = {}
    window = args.seq_len // 2  # as the paper: 4K training length, 2K window
    for name, margs in matched_args(PATTERNS, args.d_model, window, shards.vocab_size, args.repeats).items():
        if name not in names:
            continue
        run_dir = out / name
        t0 = time.perf_counter()
        if not (run_dir / "model" / "config.json").is_file():
            train(TrainConfig(model="tiny", model_args=margs, data=str(data), seq_len=args.seq_len,
                              batch_size=args.batch_size, steps=args.steps, lr=args.lr, warmup_fraction=0.05,
                              eval_every=args.steps, save_every=args.steps, out_dir=str(run_dir), tensorboard=False,
                              device=str(device)))
        train_s = time.perf_counter() - t0
        model = samba_lm.load_pretrained(run_dir / "model", device=device).eval()
        t0 = time.perf_counter()
        ppl = prefix_ppl(model, docs, lengths, chunk_size=args.seq_len)
        results[name] = dict(ppl={str(n): v for n, v in ppl.items()}, params=count_params(margs, shards.vocab_size),
                             train_tokens=args.steps * args.batch_size * args.seq_len, train_s=train_s,
                             eval_s=time.perf_counter() - t0, record=run_record(model, run_dir / "model"))
        print(name, {n: round(v, 2) for n, v in ppl.items()}, flush=True)

    table = ["| model | params (no embedding) | " + " | ".join(f"{m}x ({n})" for m, n in zip(MULTIPLES, lengths)) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for name, r in results.items():
        table.append(f"| {name} | {r['params'] / 1e6:.2f}M | " + " | ".join(f"{r['ppl'][str(n)]:.2f}" for n in lengths) + " |")
    md = "\n".join(table)
    write_json(out / "results.json", dict(args=vars(args), device=str(device), lengths=lengths,
                                          eval_tokens=n_docs * lengths[-1], models=results))
    (out / "results.md").write_text(md + "\n")
    print(md)
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot(lengths, [r["ppl"][str(n)] for n in lengths], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axvline(args.seq_len, color="grey", linestyle=":", label="training length")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity of the prefix")
    ax.set_title("Length extrapolation, Shakespeare validation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "extrapolation.png", dpi=120)


if __name__ == "__main__":
    main()
