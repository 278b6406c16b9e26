"""Packed documents with and without resets, at small scale: the `tiny` Samba trained twice on the same
blocks of the same documents from the same initialisation, once as the paper does (`pack="concat"`: a
block is cut from the documents concatenated, and a document sees the end of the one before it) and
once with the state reset after every EOS (`pack="documents"`), then scored on held-out documents and
on the passkey grid.

    python experiments/documents.py --out runs/documents          # about 17 minutes, 2 CPU cores

The corpus is Python's standard library, one `.py` file a document (the `python-stdlib` source of
`samba-lm data`, installed with Python itself), keeping the files of at most --max-doc-chars
characters so that training blocks of 512 tokens cross many document boundaries (the shards put an
EOS after every document; a new document begins after each). Each held-out document (its tokens and
its EOS) is scored four ways, every view predicting the same tokens (all but the first of each):
- alone:     from a fresh state, as `samba-lm eval ppl` scores a file;
- after EOS: from a fresh state with an EOS before it, lm-eval's convention for rolling perplexity;
- stream:    the documents concatenated into --stream-rows streams, the state carried across them;
- packed:    the same streams with `document_ids`, which must equal `alone` (the resets model only:
             reported as a check, the largest difference per token).
The NLL is also reported by the token's position in its document, where leakage and resets matter.
The passkey grid (`samba-lm eval passkey`'s functions) runs at 1x to 8x the training length.

Writes results.json (the arguments, the corpus, each model's train config, weights hash, command and
versions via run_record, every number of the tables, per-document NLL, wall time and tokens/s per
phase), results.md (the tables), documents.png (NLL against position in the document) and
passkey_<pack>.png into --out. Each model trains in its own run directory (--out/<pack>); a finished
run is reused and an interrupted one resumes from its last checkpoint. On a GPU (not run yet), a
larger setting would be e.g. `--steps 2000 --batch-size 32 --max-doc-chars 100000 --eval-tokens 400000`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samba_lm.data import TokenShards, build_shards, eos_id, iter_documents  # noqa: E402
from samba_lm.documents import documents_from_eos  # noqa: E402
from samba_lm.eval.passkey import format_table, passkey_grid, plot_grid  # noqa: E402
from samba_lm.eval.record import pyplot, run_record, write_json  # noqa: E402
from samba_lm.loading import load_for_inference, resolve_device  # noqa: E402
from samba_lm.options import HelpFormatter, ListOption  # noqa: E402
from samba_lm.prompts import left_pad  # noqa: E402
from samba_lm.train import TrainConfig, train  # noqa: E402

PACKS = ("concat", "documents")
VIEWS = ("alone", "after_eos", "stream", "packed")
# Position-in-document buckets for the table: [1], [2, 4), [4, 16), ... (position 0 has no prediction alone).
TABLE_EDGES = (1, 2, 4, 16, 64, 256, 1024)
CURVE_EDGES = tuple(2 ** i for i in range(13))  # the plot's: [1], [2, 4), [4, 8), ... [4096, inf)
# Runs whose saved train config differs only here are the same run.
NOT_THE_RUN = ("device", "progress", "out_dir")


# ----------------------------------------------------------------------------- data
def build_corpus(out: Path, max_chars: int, vocab_size: int, val_fraction: float) -> dict:
    """The standard library's files of at most max_chars characters as one .jsonl, tokenized into
    shards in out/data (reused when built with the same settings); returns what was built."""
    want = {"source": "python-stdlib", "max_doc_chars": max_chars, "vocab_size": vocab_size,
            "val_fraction": val_fraction, "python": sys.version.split()[0]}
    data, about = out / "data", out / "corpus.json"
    if (data / "index.json").is_file() and about.is_file():
        saved = json.loads(about.read_text())
        if {k: saved.get(k) for k in want} != want:
            raise SystemExit(f"{data} was built with other settings ({saved}); use another --out")
        return saved
    texts = list(iter_documents("python-stdlib"))
    kept = [t for t in texts if len(t) <= max_chars]
    corpus = out / "corpus" / "stdlib.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in kept), encoding="utf-8")
    index = build_shards(str(corpus), data, vocab_size=vocab_size, val_fraction=val_fraction)
    saved = {**want, "files": len(texts), "documents": len(kept), "chars": sum(map(len, kept)),
             "splits": {s: {k: v[k] for k in ("documents", "tokens")} for s, v in index["splits"].items()}}
    write_json(about, saved)
    return saved


def held_out_documents(shards: TokenShards, budget: int) -> list[torch.Tensor]:
    """The validation split's first documents, each with its EOS, up to `budget` tokens in all."""
    val = shards.split("val")
    tokens = torch.from_numpy(val.read(0, len(val)))
    ends = (tokens == shards.eos_id).nonzero().flatten().tolist()
    docs, start = [], 0
    for end in ends:
        if docs and end + 1 > budget:  # the split starts at 0: end + 1 tokens so far
            break
        if end > start:  # a document holds at least one token before its EOS
            docs.append(tokens[start:end + 1])
        start = end + 1
    return docs


def stream_rows(docs: list[torch.Tensor], n_rows: int) -> list[list[int]]:
    """Contiguous groups of document indices, one per stream, of about equal token counts."""
    total, rows, count = sum(len(d) for d in docs), [[]], 0
    for i, doc in enumerate(docs):
        if count >= total * len(rows) / n_rows and len(rows) < n_rows:
            rows.append([])
        rows[-1].append(i)
        count += len(doc)
    return rows


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def row_nll(model, rows: list[torch.Tensor], packed: bool = False, eos: int | None = None, chunk: int = 512,
            batch: int = 8, desc: str = "") -> list[np.ndarray]:
    """Per-token NLL of each row, each streamed through its own state from a fresh start: entry i is
    the NLL of token i + 1 given tokens 0..i. Rows are batched longest first and left-padded; a padded
    row starts at a negative position, so its padding never enters the state. packed: with
    document_ids, a new document after every `eos`."""
    device, out = next(model.parameters()).device, [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    with tqdm(total=sum(len(r) - 1 for r in rows), unit="tok", unit_scale=True, desc=desc, mininterval=1.0) as bar:
        for first in range(0, len(order), batch):
            group = order[first:first + batch]
            ids, pad = left_pad([rows[i] for i in group], model.config.vocab_size)
            labels = torch.full_like(ids, -100)
            labels[:, :-1] = ids[:, 1:]
            for j, p in enumerate(pad.tolist()):
                labels[j, :p] = -100  # predictions made from the padding
            doc_ids = documents_from_eos(ids, eos) if packed else None  # the padding joins the first document
            ids, labels = ids.to(device), labels.to(device)
            state = model.init_state(len(group), device=device, start=(-pad).tolist())
            losses = []
            for t0 in range(0, ids.shape[1], chunk):
                part = slice(t0, t0 + chunk)
                losses.append(model(ids[:, part], state=state, labels=labels[:, part],
                                    document_ids=doc_ids[:, part].to(device) if packed else None).losses)
            losses = torch.cat(losses, dim=1).double().cpu().numpy()
            for j, (i, p) in enumerate(zip(group, pad.tolist())):
                out[i] = losses[j, p:-1]
            bar.update(sum(len(rows[i]) - 1 for i in group))
    return out


def score_views(model, docs, eos: int, n_rows: int, chunk: int, views) -> dict:
    """For each view, per document: (NLL of its first token or NaN, NLL of positions 1..n) and the
    view's seconds. Position n is the document's EOS."""
    results, streams = {}, stream_rows(docs, n_rows)
    for view in views:
        t0 = time.perf_counter()
        if view == "alone":
            nll = row_nll(model, docs, chunk=chunk, desc=view)
            per_doc = [(math.nan, x) for x in nll]
        elif view == "after_eos":
            rows = [torch.cat([torch.tensor([eos]), d]) for d in docs]
            per_doc = [(x[0], x[1:]) for x in row_nll(model, rows, chunk=chunk, desc=view)]
        else:
            rows = [torch.cat([docs[i] for i in group]) for group in streams]
            nll = row_nll(model, rows, packed=view == "packed", eos=eos, chunk=chunk, desc=view)
            per_doc = [None] * len(docs)
            for group, x in zip(streams, nll):
                offset = 0
                for i in group:  # token p of the document sits at offset + p, predicted by entry offset + p - 1
                    n = len(docs[i]) - 1
                    per_doc[i] = (x[offset - 1] if offset else math.nan, x[offset:offset + n])
                    offset += n + 1
        seconds = time.perf_counter() - t0
        results[view] = {"per_doc": per_doc, "seconds": seconds,
                         "tokens_per_s": sum(len(d) for d in docs) / seconds}
    return results


def summarize(per_doc, edges=TABLE_EDGES) -> dict:
    """Token-weighted mean NLL and perplexity over positions >= 1, per position bucket, and of the
    documents' first tokens where the view predicts them."""
    nll = np.concatenate([x for _, x in per_doc])
    pos = np.concatenate([np.arange(1, len(x) + 1) for _, x in per_doc])
    bounds = [*edges, math.inf]
    buckets = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        inside = (pos >= lo) & (pos < hi)
        if inside.any():
            mean = float(nll[inside].mean())
            buckets.append({"start": lo, "end": hi if hi != math.inf else None, "tokens": int(inside.sum()),
                            "nll": mean, "ppl": math.exp(mean)})
    firsts = np.array([f for f, _ in per_doc])
    first = float(np.nanmean(firsts)) if not np.isnan(firsts).all() else None
    mean = float(nll.mean())
    return {"tokens": len(nll), "nll": mean, "ppl": math.exp(mean), "first_token_nll": first, "buckets": buckets,
            "doc_nll": [float(x.mean()) for _, x in per_doc]}


# ----------------------------------------------------------------------------- the two runs
def train_config(args, data: Path, pack: str, device) -> TrainConfig:
    return TrainConfig(model="tiny", data=str(data), pack=pack, seq_len=args.seq_len, batch_size=args.batch_size,
                       steps=args.steps, lr=args.lr, warmup_fraction=0.05, seed=args.seed, eval_every=args.steps,
                       save_every=max(1, args.steps // 4), out_dir=str(Path(args.out) / pack), tensorboard=False,
                       device=str(device))


def train_once(cfg: TrainConfig) -> dict:
    """Train, or reuse a finished run of the same config; the training's wall time and tokens/s."""
    run, timing = Path(cfg.out_dir), Path(cfg.out_dir) / "experiment_timing.json"
    if (run / "train_config.json").is_file():
        saved = json.loads((run / "train_config.json").read_text())["train"]
        now = cfg.to_dict()
        diff = {k: (saved.get(k), now[k]) for k in now if k not in NOT_THE_RUN and saved.get(k) != now[k]}
        if diff:
            raise SystemExit(f"{run} holds another run ({diff}, saved vs now); use another --out")
    if (run / "model" / "config.json").is_file() and timing.is_file():
        return {**json.loads(timing.read_text()), "reused": True}
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0  # this process's share, if it resumed an interrupted run
    result = {"train_s": seconds, "train_tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
              "tokens_per_s": cfg.steps * cfg.batch_size * cfg.seq_len / seconds}
    write_json(timing, result)
    return {**result, "reused": False}


def evaluate_model(args, pack: str, docs, device) -> dict:
    run = Path(args.out) / pack
    model, tokenizer = load_for_inference(run / "model", device)
    eos = eos_id(tokenizer)
    views = VIEWS if pack == "documents" else VIEWS[:3]
    scored = score_views(model, docs, eos, args.stream_rows, args.chunk_size, views)
    summary = {view: {**summarize(s["per_doc"]), "curve": summarize(s["per_doc"], CURVE_EDGES)["buckets"],
                      "seconds": s["seconds"], "tokens_per_s": s["tokens_per_s"]} for view, s in scored.items()}
    if "packed" in scored:
        diff = np.concatenate([np.abs(a[1] - p[1]) for a, p in zip(scored["alone"]["per_doc"],
                                                                     scored["packed"]["per_doc"])])
        summary["packed_vs_alone"] = {"max_abs_nll_diff": float(diff.max()), "mean_abs_nll_diff": float(diff.mean())}
    t0 = time.perf_counter()
    lengths = [m * args.seq_len for m in args.passkey_multiples]
    grid = passkey_grid(model, tokenizer, lengths, args.depths, args.keys, args.seed)
    seconds = time.perf_counter() - t0
    grid.update(seconds=seconds, prompt_tokens_per_s=sum(lengths) * len(args.depths) * args.keys / seconds)
    plot_grid(grid, Path(args.out) / f"passkey_{pack}.png", f"passkey, tiny, pack={pack}")
    return {"views": summary, "passkey": grid, "record": run_record(model, run / "model")}


# ----------------------------------------------------------------------------- report
NAMES = {"alone": "alone", "after_eos": "after EOS", "stream": "stream", "packed": "packed (check)"}


def _bucket_name(b: dict) -> str:
    if b["end"] is None:
        return f"{b['start']}+"
    return str(b["start"]) if b["end"] == b["start"] + 1 else f"{b['start']}-{b['end'] - 1}"


def ppl_table(results: dict) -> list[str]:
    lines = ["Perplexity per token over the held-out documents, every position but each document's first "
             "(mean NLL in nats); first token: the perplexity of the documents' first tokens, where the view "
             "predicts them (from the previous document's EOS in the stream, from the lone EOS after EOS):", "",
             "| model | " + " | ".join(NAMES.values()) + " | first token, stream | first token, after EOS |",
             "|---|" + "---|" * (len(NAMES) + 2)]
    for pack, r in results.items():
        v = r["views"]
        cells = [f"{v[view]['ppl']:.2f} ({v[view]['nll']:.4f})" if view in v else "-" for view in NAMES]
        firsts = [f"{math.exp(v[view]['first_token_nll']):.1f}" for view in ("stream", "after_eos")]
        lines.append(f"| {pack} | " + " | ".join(cells + firsts) + " |")
    if len(results) == 2:
        a, b = (r["views"] for r in results.values())
        wins = {view: sum(y < x for x, y in zip(a[view]["doc_nll"], b[view]["doc_nll"])) for view in NAMES if view in a}
        lines += ["", f"{list(results)[1]} has the lower mean NLL on {wins['alone']} of {len(a['alone']['doc_nll'])} "
                      f"documents alone, " + ", ".join(f"{n} {NAMES[view]}" for view, n in wins.items()
                                                       if view != "alone") + "."]
    for pack, r in results.items():
        if "packed_vs_alone" in r["views"]:
            c = r["views"]["packed_vs_alone"]
            lines.append(f"Check, {pack}: packed vs alone, largest difference of a token's NLL "
                         f"{c['max_abs_nll_diff']:.1e} (mean {c['mean_abs_nll_diff']:.1e}), float32.")
    return lines


def position_table(results: dict) -> list[str]:
    buckets = next(iter(results.values()))["views"]["alone"]["buckets"]
    lines = ["Perplexity by the token's position in its document:", "",
             "| model | view | " + " | ".join(_bucket_name(b) for b in buckets) + " |",
             "|---|---|" + "---|" * len(buckets)]
    for pack, r in results.items():
        for view in ("alone", "after_eos", "stream"):
            row = r["views"][view]["buckets"]
            lines.append(f"| {pack} | {NAMES[view]} | " + " | ".join(f"{b['ppl']:.2f}" for b in row) + " |")
    return lines + ["| tokens | | " + " | ".join(f"{b['tokens']:,}" for b in buckets) + " |"]


def passkey_table(results: dict, depths, keys: int) -> list[str]:
    lines = [f"Passkey accuracy ({keys} keys a cell), by prompt length and needle depth:", "",
             "| model | length | " + " | ".join(f"{d:.0%}" for d in depths) + " | mean |",
             "|---|---|" + "---|" * (len(depths) + 1)]
    for pack, r in results.items():
        g = r["passkey"]
        for n, row in zip(g["lengths"], g["accuracy"]):
            lines.append(f"| {pack} | {n} | " + " | ".join(f"{a:.2f}" for a in row) + f" | {sum(row) / len(row):.2f} |")
    lines.append("")
    for pack, r in results.items():
        answers = [t["answer"] for t in r["passkey"]["trials"]]
        common = max(set(answers), key=answers.count)
        lines.append(f"Most common answer, {pack}: {common!r} ({answers.count(common)} of {len(answers)}).")
    return lines


def tables(results: dict, args) -> str:
    return "\n".join([*ppl_table(results), "", *position_table(results), "",
                      *passkey_table(results, args.depths, args.keys)])


def plot(results: dict, path: Path, seq_len: int):
    """Mean NLL against the position in the document (left) and the resets model's difference (right)."""
    plt = pyplot()
    if plt is None:
        return
    fig, (ax, diff) = plt.subplots(1, 2, figsize=(11, 4.5))
    curves = {(pack, view): r["views"][view]["curve"] for pack, r in results.items() for view in ("alone", "stream")}
    for (pack, view), buckets in curves.items():
        x = [math.sqrt(b["start"] * (b["end"] or 2 * b["start"])) for b in buckets]  # the open last: up to 2x
        color, style = ("tab:blue" if pack == "concat" else "tab:orange"), ("-" if view == "alone" else "--")
        ax.plot(x, [b["nll"] for b in buckets], style, marker="o", ms=3, color=color, label=f"{pack}, {view}")
        if pack == "documents" and ("concat", view) in curves:
            base = curves["concat", view]
            diff.plot(x, [b["nll"] - c["nll"] for b, c in zip(buckets, base)], style, marker="o", ms=3,
                      color="black", label=f"{view}: documents - concat")
    for a in (ax, diff):
        a.set_xscale("log", base=2)
        a.axvline(seq_len, color="grey", linestyle=":", label="training length")
        a.set_xlabel("position of the token in its document (log-2 buckets)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    diff.axhline(0, color="grey", lw=1)
    ax.set_ylabel("mean NLL (nats)")
    diff.set_ylabel("difference of mean NLL (nats)")
    ax.set_title("tiny Samba, held-out stdlib files")
    diff.set_title("resets (documents) minus none (concat)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/documents", help="output folder: data, one run per pack, results")
    p.add_argument("--max-doc-chars", type=int, default=16000,
                   help="keep the standard library's files of at most this many characters")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of the files held out")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained on the training files")
    p.add_argument("--seq-len", type=int, default=512, help="training length")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of each model")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (5%% warmup, cosine decay)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the data order and the keys")
    p.add_argument("--eval-tokens", type=int, default=60000,
                   help="held-out tokens scored: whole documents in the split's order, up to this many")
    p.add_argument("--stream-rows", type=int, default=8, help="streams the held-out documents are concatenated into")
    p.add_argument("--chunk-size", type=int, default=512, help="tokens per forward while scoring")
    p.add_argument("--passkey-multiples", action=ListOption, item=int, default=[1, 2, 4, 8], metavar="M,M,...",
                   help="passkey prompt lengths, as multiples of --seq-len")
    p.add_argument("--depths", action=ListOption, item=float, default=[0.0, 0.5, 1.0], metavar="D,D,...",
                   help="passkey needle depths, fractions of the filler")
    p.add_argument("--keys", type=int, default=4, help="passkey keys per (length, depth) cell")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=1,
                   help="torch's CPU threads (0: torch's default, one per core). One is the fastest on a 2-core "
                        "machine that other jobs share: two threads competing with another process for the "
                        "cores wait for each other and ran 2-10x slower there")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device, out, started = resolve_device(args.device), Path(args.out), time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    corpus = build_corpus(out, args.max_doc_chars, args.vocab_size, args.val_fraction)
    data_s = time.perf_counter() - t0
    shards = TokenShards(out / "data")
    docs = held_out_documents(shards, args.eval_tokens)
    print(f"corpus: {corpus['documents']} of {corpus['files']} standard-library files; held out: {len(docs)} "
          f"documents, {sum(len(d) for d in docs):,} tokens", flush=True)

    results, configs = {}, {}
    for pack in PACKS:
        cfg = train_config(args, out / "data", pack, device)
        timing = train_once(cfg)
        results[pack] = {"train": timing, **evaluate_model(args, pack, docs, device)}
        configs[pack] = cfg.to_dict()
        print(f"{pack}: " + ", ".join(f"{v} ppl {s['ppl']:.3f}" for v, s in results[pack]["views"].items()
                                      if "ppl" in s), flush=True)
        print(format_table(results[pack]["passkey"]), flush=True)

    md = tables(results, args)
    write_json(out / "results.json", dict(
        args=vars(args), device=str(device), threads=torch.get_num_threads(), corpus=corpus, data_s=data_s,
        wall_s=time.perf_counter() - started,
        held_out={"documents": len(docs), "tokens": sum(len(d) for d in docs), "lengths": [len(d) for d in docs]},
        train_configs=configs, models=results))
    (out / "results.md").write_text(md + "\n")
    plot(results, out / "documents.png", args.seq_len)
    print(md)


if __name__ == "__main__":
    main()
