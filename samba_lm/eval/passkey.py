"""Passkey retrieval: accuracy over prompt lengths x needle depths, the protocol of the Samba paper
(Landmark attention's prompt, a random 5-digit key; the paper: 4K..256K x 11 depths x 5 keys).

Each cell's keys are drawn from a generator seeded by (seed, length, depth), so a cell's trials do not
change when other lengths or depths are added. The keys of a cell are generated as one batch,
greedily; a trial is right when the answer's leading digits are exactly the key. The prompts and the
fine-tuning task live in samba_lm/data/passkey.py.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from ..data import eos_id
from ..data.passkey import passkey_prompt, random_key, retrieved
from ..generation import generate
from ..loading import load_for_inference, resolve_device
from ..options import DEVICE_HELP, ListOption, check_out_dir, parse_count
from .record import pyplot, run_record, write_json

PAPER_DEPTHS = [i / 10 for i in range(11)]


def check_grid(lengths, depths, n_keys, max_new_tokens):
    """Argument rules, named as the command line names them."""
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"--lengths must be one or more positive token counts, got {lengths!r}")
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"--depths must be one or more fractions in [0, 1], got {depths!r}")
    if not isinstance(n_keys, int) or n_keys < 1:
        raise ValueError(f"--keys must be a positive int, got {n_keys!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive int, got {max_new_tokens!r}")


def passkey_grid(model, tokenizer: Tokenizer, lengths, depths=PAPER_DEPTHS, n_keys: int = 5, seed: int = 0,
                 max_new_tokens: int = 8, progress: bool = True, prefill_chunk: int | None = None) -> dict:
    """Accuracy [len(lengths)][len(depths)], each the mean over n_keys keys, and every trial.
    prefill_chunk: prompt tokens per prefill call (generate's; the results do not depend on it)."""
    check_grid(lengths, depths, n_keys, max_new_tokens)
    for depth in depths:  # a length too short for some key's prompt fails now, not midway
        _cell(tokenizer, seed, min(lengths), depth, n_keys)
    eos = eos_id(tokenizer)
    trials, accuracy = [], []
    with tqdm(total=len(lengths) * len(depths) * n_keys, unit="trial", desc="passkey", disable=not progress) as bar:
        for length in lengths:
            accuracy.append([])
            for depth in depths:
                keys, prompts = _cell(tokenizer, seed, length, depth, n_keys)
                outputs = generate(model, [ids for ids, _ in prompts], max_new_tokens, temperature=0.0,
                                   stop_tokens=[eos], prefill_chunk=prefill_chunk)
                cell = []
                for key, (ids, needle_at), out in zip(keys, prompts, outputs):
                    answer = tokenizer.decode(out[len(ids):].tolist())
                    cell.append(retrieved(answer, key))
                    trials.append({"length": length, "depth": depth, "key": key, "needle_at": needle_at,
                                   "answer": answer, "correct": cell[-1]})
                accuracy[-1].append(sum(cell) / n_keys)
                bar.update(n_keys)
    return {"lengths": list(lengths), "depths": list(depths), "n_keys": n_keys, "seed": seed,
            "max_new_tokens": max_new_tokens, "accuracy": accuracy,
            "mean_accuracy": sum(t["correct"] for t in trials) / len(trials), "trials": trials}


def _cell(tokenizer, seed, length, depth, n_keys) -> tuple[list[str], list[tuple[list[int], int]]]:
    """The keys of one (length, depth) cell and their prompts."""
    rng = random.Random(f"passkey/{seed}/{length}/{depth}")
    keys = [random_key(rng) for _ in range(n_keys)]
    try:
        return keys, [passkey_prompt(tokenizer, length, key, depth) for key in keys]
    except ValueError as e:
        raise ValueError(f"--lengths: {e}") from None


def plot_grid(result: dict, path: str | Path, title: str = "passkey retrieval") -> Path | None:
    """Heatmap: depth (rows) against prompt length (columns), as in the paper's figure."""
    plt = pyplot()
    if plt is None:
        return None
    grid = np.array(result["accuracy"]).T  # [depths, lengths]
    fig, ax = plt.subplots(figsize=(2.5 + 0.8 * grid.shape[1], 1.5 + 0.35 * grid.shape[0]), dpi=110)
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(grid.shape[1]), [_short(n) for n in result["lengths"]])
    ax.set_yticks(range(grid.shape[0]), [f"{d:.0%}" for d in result["depths"]])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{title}: {result['mean_accuracy']:.1%}")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _short(n: int) -> str:
    return f"{n >> 10}K" if n % 1024 == 0 and n >= 1024 else str(n)


def format_table(result: dict) -> str:
    head = f"{'length':>8} | " + " ".join(f"{d:>5.0%}" for d in result["depths"]) + " |  mean"
    rows = [f"{_short(n):>8} | " + " ".join(f"{a:>5.2f}" for a in row) + f" | {sum(row) / len(row):5.2f}"
            for n, row in zip(result["lengths"], result["accuracy"])]
    return "\n".join([head, "-" * len(head), *rows])


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--model", required=True, help="a saved model, a training checkpoint or a run directory")
    parser.add_argument("--lengths", action=ListOption, item=parse_count, default=[4096], metavar="N,N,...",
                        help="prompt lengths in tokens, e.g. 4K,16K (the paper: 4K to 256K)")
    parser.add_argument("--depths", action=ListOption, item=float, default=PAPER_DEPTHS, metavar="D,D,...",
                        help="needle depths, fractions of the filler (the paper's: 0, 0.1, .., 1)")
    parser.add_argument("--keys", type=int, default=5, help="random keys per (length, depth) cell")
    parser.add_argument("--seed", type=int, default=0, help="seed of the keys")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated after the question")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--out", default="results", help="directory for passkey.json and passkey.png")


def run(args: argparse.Namespace) -> dict:
    """Evaluate, write OUT/passkey.json and OUT/passkey.png, print the table; return the payload."""
    check_grid(args.lengths, args.depths, args.keys, args.max_new_tokens)  # before loading anything
    check_out_dir(args.out, "--out")
    model, tokenizer = load_for_inference(args.model, resolve_device(args.device))
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer.json beside {args.model}: cannot build the prompts")
    result = passkey_grid(model, tokenizer, args.lengths, args.depths, args.keys, args.seed, args.max_new_tokens)
    payload = {"task": "passkey", **result, "run": run_record(model, args.model, getattr(args, "argv", None))}
    out = Path(args.out)
    write_json(out / "passkey.json", payload)
    plot_grid(result, out / "passkey.png", f"passkey retrieval, {Path(args.model).name}")
    print(format_table(result))
    print(f"mean accuracy {result['mean_accuracy']:.3f} over {len(result['trials'])} trials; "
          f"wrote {out / 'passkey.json'}")
    return payload
