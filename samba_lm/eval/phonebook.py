"""Phonebook lookup (Jelassi et al. 2024, "Repeat After Me"): a phonebook of N lines "Name: number",
then a question about one of its names; exact-match accuracy against N.

Unlike the passkey, every line may be the one asked about, so a model whose memory is a fixed-size
state (Mamba's, or a window's) must keep all of them; Jelassi et al. show recurrent models falling
behind full attention here as the book grows. Everything is generated offline from built-in name
lists: trial t of a book of N entries is seeded by (seed, N, t), with N distinct names, N distinct
numbers and the asked entry drawn at random.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from tokenizers import Tokenizer
from tqdm import tqdm

from ..data import eos_id
from ..generation import generate
from ..loading import load_for_inference, resolve_device
from ..options import DEVICE_HELP, ListOption, check_out_dir
from .record import pyplot, run_record, write_json

FIRST_NAMES = """
James Mary John Patricia Robert Jennifer Michael Linda William Elizabeth David Barbara Richard Susan Joseph
Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy Matthew Betty Anthony Margaret Mark Sandra
Donald Ashley Steven Kimberly Paul Emily Andrew Donna Joshua Michelle Kenneth Carol Kevin Amanda Brian
Dorothy George Melissa Timothy Deborah Ronald Stephanie Edward Rebecca Jason Sharon Jeffrey Laura Ryan
Cynthia Jacob Kathleen Gary Amy Nicholas Angela Eric Shirley Jonathan Anna Stephen Brenda Larry Pamela
Justin Emma Scott Nicole Brandon Helen Benjamin Samantha Samuel Katherine Gregory Christine Alexander Debra
Frank Rachel Patrick Carolyn Raymond Janet Jack Catherine Dennis Maria Jerry Heather
""".split()
LAST_NAMES = """
Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez Wilson
Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris Sanchez Clark Ramirez Lewis
Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill Flores Green Adams Nelson Baker Hall Rivera
Campbell Mitchell Carter Roberts Gomez Phillips Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart
Morris Morales Murphy Cook Rogers Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly Howard Ramos Kim
Cox Ward Richardson Watson Brooks Chavez Wood James Bennett Gray Mendoza Ruiz Hughes Price Alvarez Castillo
Sanders Patel Myers Long Ross Foster Jimenez
""".split()
MAX_ENTRIES = len(FIRST_NAMES) * len(LAST_NAMES)  # every name in a book is distinct
QUESTION = "What is the phone number of {name}? The phone number of {name} is"


def phonebook(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n (name, number) pairs, names and numbers all distinct; numbers like 609-373-1813."""
    picks = rng.sample(range(MAX_ENTRIES), n)
    names = [f"{FIRST_NAMES[i // len(LAST_NAMES)]} {LAST_NAMES[i % len(LAST_NAMES)]}" for i in picks]
    numbers: dict[str, None] = {}  # insertion-ordered set
    while len(numbers) < n:
        numbers[f"{rng.randint(200, 999)}-{rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"] = None
    return list(zip(names, numbers))


def phonebook_prompt(book: list[tuple[str, str]], name: str) -> str:
    """The book, one "Name: number" per line, then the question about `name`."""
    return "".join(f"{entry}: {number}\n" for entry, number in book) + QUESTION.format(name=name)


def answered(text: str, number: str) -> bool:
    """Exact match: the generated text's leading run of digits and hyphens (after spaces) is the number."""
    found = re.match(r"\s*([\d-]+)", text)
    return found is not None and found.group(1) == number


def check_args(entries, trials, max_new_tokens):
    """Argument rules, named as the command line names them."""
    if not entries or any(not isinstance(n, int) or not 1 <= n <= MAX_ENTRIES for n in entries):
        raise ValueError(f"--entries must be one or more ints in [1, {MAX_ENTRIES}] (the distinct names "
                         f"available), got {entries!r}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"--trials must be a positive int, got {trials!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive int, got {max_new_tokens!r}")


def phonebook_eval(model, tokenizer: Tokenizer, entries, trials: int = 10, seed: int = 0,
                   max_new_tokens: int = 16, progress: bool = True) -> dict:
    """Accuracy per book size (the trials of a size are generated as one batch), and every trial."""
    check_args(entries, trials, max_new_tokens)
    eos = eos_id(tokenizer)
    records, accuracy, prompt_tokens = [], [], []
    with tqdm(total=len(entries) * trials, unit="trial", desc="phonebook", disable=not progress) as bar:
        for n in entries:
            cases = []
            for t in range(trials):
                rng = random.Random(f"phonebook/{seed}/{n}/{t}")
                book = phonebook(n, rng)
                asked = rng.randrange(n)
                cases.append((asked, book[asked], tokenizer.encode(phonebook_prompt(book, book[asked][0])).ids))
            outputs = generate(model, [ids for *_, ids in cases], max_new_tokens, temperature=0.0, stop_tokens=[eos])
            size = []
            for (asked, (name, number), ids), out in zip(cases, outputs):
                answer = tokenizer.decode(out[len(ids):].tolist())
                size.append({"entries": n, "name": name, "number": number, "position": asked,
                             "prompt_tokens": len(ids), "answer": answer, "correct": answered(answer, number)})
            accuracy.append(sum(r["correct"] for r in size) / trials)
            prompt_tokens.append(round(sum(r["prompt_tokens"] for r in size) / trials))
            records += size
            bar.update(trials)
    return {"entries": list(entries), "trials_per_size": trials, "seed": seed, "max_new_tokens": max_new_tokens,
            "accuracy": accuracy, "mean_prompt_tokens": prompt_tokens, "trials": records}


def plot_accuracy(result: dict, path: str | Path, title: str = "phonebook lookup") -> Path | None:
    """Accuracy against the number of entries, each point labelled with its mean prompt length."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(result["entries"], result["accuracy"], "o-", lw=2)
    for n, acc, tokens in zip(result["entries"], result["accuracy"], result["mean_prompt_tokens"]):
        ax.annotate(f"{tokens} tok", (n, acc), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    if len(result["entries"]) > 1 and max(result["entries"]) >= 10 * min(result["entries"]):
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(result["entries"], [str(n) for n in result["entries"]])
    ax.set_ylim(-0.05, 1.1)
    ax.set_xlabel("entries in the phonebook")
    ax.set_ylabel(f"exact-match accuracy ({result['trials_per_size']} trials)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def format_table(result: dict) -> str:
    rows = [f"{n:>8} | {tokens:>13} | {acc:8.2f}"
            for n, tokens, acc in zip(result["entries"], result["mean_prompt_tokens"], result["accuracy"])]
    head = f"{'entries':>8} | {'prompt tokens':>13} | accuracy"
    return "\n".join([head, "-" * len(head), *rows])


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--model", required=True, help="a saved model, a training checkpoint or a run directory")
    parser.add_argument("--entries", action=ListOption, item=int, default=[10, 30, 100, 300, 1000], metavar="N,N,...",
                        help=f"phonebook sizes (at most {MAX_ENTRIES})")
    parser.add_argument("--trials", type=int, default=10, help="phonebooks per size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the books and of the entries asked for")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated after the question")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--out", default="results", help="directory for phonebook.json and phonebook.png")


def run(args: argparse.Namespace) -> dict:
    """Evaluate, write OUT/phonebook.json and OUT/phonebook.png, print the table; return the payload."""
    check_args(args.entries, args.trials, args.max_new_tokens)  # before loading anything
    check_out_dir(args.out, "--out")
    model, tokenizer = load_for_inference(args.model, resolve_device(args.device))
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer.json beside {args.model}: cannot build the prompts")
    result = phonebook_eval(model, tokenizer, args.entries, args.trials, args.seed, args.max_new_tokens)
    payload = {"task": "phonebook", **result, "run": run_record(model, args.model, getattr(args, "argv", None))}
    out = Path(args.out)
    write_json(out / "phonebook.json", payload)
    plot_accuracy(result, out / "phonebook.png", f"phonebook lookup, {Path(args.model).name}")
    print(format_table(result))
    print(f"wrote {out / 'phonebook.json'}")
    return payload
