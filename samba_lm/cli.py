"""`samba-lm` command line: data, train, generate, eval, info, export.

Every bad input ends the same way: one line `samba-lm COMMAND: error: WHAT` on stderr and exit status
1, before any work where it can be known then. Ctrl-C ends a command with status 130 (SIGTERM: 143).
"""

from __future__ import annotations

import argparse
import errno
import json
import shutil
import signal
import sys
from pathlib import Path

import torch

from .loading import resolve_device
from .options import DEVICE_HELP, HelpFormatter, ListOption, check_out_dir


def cmd_data(args):
    from .data import build_shards

    index = build_shards(args.source, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                         val_fraction=args.val_fraction, seed=args.seed, shard_tokens=args.shard_tokens,
                         jsonl_field=args.jsonl_field, parquet_column=args.parquet_column,
                         on_bad_file=args.on_bad_file, progress=not args.no_progress)
    read = index["read"]
    skipped = f", {len(read['skipped'])} left out as not text" if read["skipped"] else ""
    print(f"read {read['files']:,} files ({read['documents']:,} documents){skipped}")
    for bad in read["skipped"]:
        print(f"  left out {bad['file']}: {bad['reason']}")
    splits = ", ".join(f"{name}: {s['tokens']:,} tokens in {s['documents']:,} documents"
                       for name, s in index["splits"].items())
    print(f"wrote {args.out} (vocab {index['vocab_size']}, {index['dtype']}): {splits}")


def cmd_train(args):
    from .train import train
    from .train.config import config_from_args

    train(config_from_args(args))


def cmd_generate(args):
    from .data import eos_id
    from .loading import load_for_generation, stop_token_ids
    from .engine import check_generation_args
    from .generation import generate_stream

    # Every argument is checked before the model loads and before any of the prompt is printed.
    check_generation_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p, None)
    if args.sync_every < 1:
        raise ValueError(f"--sync-every must be a positive int (decode steps between reads), got {args.sync_every}")
    device = resolve_device(args.device)
    model, tokenizer, where = load_for_generation(args.model, device)
    prompt = tokenizer.encode(args.prompt).ids or [eos_id(tokenizer)]
    # A Hugging Face checkpoint's generation_config.json may name more (Phi-4's <|end|>).
    stops = list(dict.fromkeys([eos_id(tokenizer), *stop_token_ids(where)]))
    stream = generate_stream(model, [prompt], args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                             args.seed, stop_tokens=stops, cuda_graph=False if args.no_cuda_graph else None,
                             sync_every=args.sync_every)
    sys.stdout.write(args.prompt)
    new, shown = [], ""
    for token in stream:
        new.append(int(token[0]))
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write("\n")


def cmd_info(args):
    from .checkpoint import load_config, read_checkpoint_meta
    from .config import LAYER_KINDS, SambaConfig
    from .flops import flops_per_token
    from .loading import resolve_model_dir
    from .model import SambaLM

    if args.model:
        where, kind = resolve_model_dir(args.model)
        cfg = load_config(where) if kind == "model" else SambaConfig.from_dict(read_checkpoint_meta(where)["model_config"])
    else:
        cfg = SambaConfig.from_preset(args.preset, **({"vocab_size": args.vocab_size} if args.vocab_size else {}))
    with torch.device("meta"):
        model = SambaLM(cfg)
        state = model.init_state(args.batch_size, dtype=getattr(torch, args.dtype))
    n = sum(p.numel() for p in model.parameters())
    emb = cfg.vocab_size * cfg.d_model
    kinds = ", ".join(f"{cfg.count(k)} {k}" for k in LAYER_KINDS if cfg.count(k))
    fpt = flops_per_token(cfg, args.seq_len)
    info = {
        "config": cfg.name, "layers": kinds, "parameters": n, "non_embedding_parameters": n - emb,
        f"state_bytes_batch_{args.batch_size}_{args.dtype}": state.nbytes(),
        f"forward_flops_per_token_at_{args.seq_len}": round(fpt), "training_flops_per_token": round(3 * fpt),
    }
    if cfg.grows:
        info["note"] = "full-attention layers keep a cache that grows with the stream; the state size shown is its start"
    print(json.dumps(info, indent=2) if args.json else "\n".join(f"{k:>40}: {v:,}" if isinstance(v, int) else
                                                                  f"{k:>40}: {v}" for k, v in info.items()))


def cmd_export(args):
    from .checkpoint import model_from_training_checkpoint, save_pretrained
    from .loading import TOKENIZER_FILE, find_tokenizer, resolve_checkpoint_dir

    check_out_dir(args.out, "--out")
    where = resolve_checkpoint_dir(args.checkpoint)
    model = model_from_training_checkpoint(where)
    save_pretrained(model, args.out)
    tokenizer = find_tokenizer(where)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, Path(args.out) / TOKENIZER_FILE)
    print(f"exported {where} -> {args.out}")


def _evaluations() -> dict:
    from .eval import harness, passkey, phonebook, ppl

    return {"ppl": (ppl, "perplexity against context length, streaming long documents through the state"),
            "passkey": (passkey, "passkey retrieval: accuracy over prompt lengths x needle depths"),
            "phonebook": (phonebook, "phonebook lookup: accuracy against the number of entries"),
            "harness": (harness, "lm-evaluation-harness tasks (local task files, offline; needs samba-lm[eval])")}


class _Parser(argparse.ArgumentParser):
    """Help that shows every default; a bad flag ends like every other bad input (see main)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _is_path(text: str) -> bool:
    return Path(text).exists()


CONVERT_FORMATS = {"official": "the official Samba code's .pth checkpoint (microsoft/Samba, lit_gpt)",
                   "llama": "a transformers LlamaForCausalLM directory (the llama presets)",
                   "mistral": "a transformers MistralForCausalLM directory (the sliding-window-only presets)",
                   "mamba": "a transformers MambaForCausalLM directory (the mamba presets)",
                   "phi4flash": "a Hugging Face Phi-4-mini-flash-reasoning directory (SambaY; --from only)"}


def cmd_convert(args):
    if (args.from_format is None) == (args.to_format is None):
        raise ValueError("give one of --from FORMAT (into samba-lm) or --to FORMAT (out of samba-lm)")
    fmt = args.from_format or args.to_format
    if args.config is not None and fmt != "official":
        raise ValueError(f"--config names an official Samba config; --{'from' if args.from_format else 'to'} "
                         f"{fmt} takes its shape from the model")
    if args.to_format == "phi4flash":
        raise ValueError("--to phi4flash: samba-lm reads Phi-4-mini-flash checkpoints but does not write them")
    if args.from_format == "phi4flash":
        from .checkpoint import save_pretrained
        from .loading import TOKENIZER_SIDE_FILES
        from .convert.phi4flash import from_phi4flash, is_phi4flash

        if not is_phi4flash(args.source):
            raise ValueError(f"--from phi4flash: {args.source} has no config.json with model_type 'phi4flash'")
        check_out_dir(args.out, "--out")
        save_pretrained(from_phi4flash(args.source), args.out)
        for name in TOKENIZER_SIDE_FILES:  # the tokenizer, its chat template and end-of-turn tokens
            if (Path(args.source) / name).is_file():
                shutil.copyfile(Path(args.source) / name, Path(args.out) / name)
    elif args.from_format == "official":
        from .convert.official import from_official

        check_out_dir(args.out, "--out")
        from_official(args.source, args.config, out_dir=args.out)
    elif args.to_format == "official":
        from .checkpoint import load_pretrained
        from .convert.official import to_official

        to_official(load_pretrained(args.source), args.out, args.config)
    else:
        from .checkpoint import load_config

        try:
            from .convert.hf_formats import architecture, export_hf, import_hf
        except ImportError as e:  # transformers is an optional extra
            raise ValueError(str(e)) from None

        check_out_dir(args.out, "--out")
        if args.from_format:
            config = Path(args.source) / "config.json"
            found = json.loads(config.read_text()).get("model_type") if config.is_file() else None
            if found != fmt:
                raise ValueError(f"--from {fmt}: {args.source} holds a {found or 'non-transformers'} model "
                                 f"({config} model_type)")
            import_hf(args.source, args.out)
        else:
            found = architecture(load_config(args.source).layers)
            if found != fmt:
                raise ValueError(f"--to {fmt}: {args.source} is a {found}-shaped model; use --to {found}")
            export_hf(args.source, args.out)
    print(f"converted {args.source} ({args.from_format or 'samba-lm'}) -> {args.out} ({args.to_format or 'samba-lm'})")


def cmd_serve(args):
    from .serving.command import main as serve

    serve(args)


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    from .data.sources import ON_BAD_FILE
    from .serving.arguments import add_arguments as serve_arguments
    from .train.config import add_arguments

    parser = _Parser(prog="samba-lm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="tokenize a corpus into shards (trains a BPE tokenizer unless given one)")
    p.add_argument("--source", action=ListOption, keep_whole=_is_path, default=["shakespeare"], metavar="SOURCE,...",
                   help="'shakespeare', 'python-stdlib', or paths: text files and directories, .jsonl, .parquet; "
                        "several are concatenated (a path that exists is taken whole, commas and all)")
    p.add_argument("--out", default="data/shakespeare", help="the shard directory to write")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokens of the BPE trained on the training split")
    p.add_argument("--tokenizer", help="a tokenizer.json to use instead of training one")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of the documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard file")
    p.add_argument("--jsonl-field", default="text", help="the field of each .jsonl record that holds the text")
    p.add_argument("--parquet-column", default="text", help="the column of a .parquet file that holds the text")
    p.add_argument("--on-bad-file", default="skip", choices=ON_BAD_FILE,
                   help="a file that is not UTF-8 text (binary, compressed, UTF-16, ...): skip it with a warning "
                        "that names it, or stop with an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train a model (one process, or under torchrun with DDP/FSDP2)")
    add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    p.add_argument("--model", required=True, help="a saved model, a training checkpoint or a run directory")
    p.add_argument("--prompt", default="", help="the text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0: greedy")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens only (default: all)")
    p.add_argument("--top-p", type=float, default=0.95, help="sample from the smallest set of tokens that holds "
                                                             "this much probability")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--sync-every", type=int, default=16,
                   help="decode steps between reads of the GPU: text appears in bursts of this many tokens")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="decode eagerly on a GPU too (debugging; the tokens are the same)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="evaluate a model: perplexity vs length, passkey retrieval, phonebook lookup, "
                                   "lm-eval tasks")
    evals = p.add_subparsers(dest="evaluation", required=True, parser_class=_Parser)
    for name, (module, help_) in _evaluations().items():
        q = evals.add_parser(name, help=help_)
        module.add_arguments(q)
        q.set_defaults(func=module.run)

    p = sub.add_parser("info", help="parameters, state size and FLOPs per token of a preset or a model")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="the preset to describe")
    p.add_argument("--model", help="a saved model, checkpoint or run directory (instead of --preset)")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary size (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=1, help="rows of the state whose size is shown")
    p.add_argument("--seq-len", type=int, default=4096, help="context length of the FLOPs per token")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the state (the Mamba state stays float32)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, streaming) with continuous "
                                    "batching (pip install 'samba-lm[serve]')")
    serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="convert a model to or from the official Samba checkpoints and "
                                      "transformers' Llama, Mistral and Mamba formats")
    p.add_argument("source", metavar="SRC", help="the model to convert: in --from's format, or a samba-lm saved "
                                                 "model for --to")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="from_format", choices=list(CONVERT_FORMATS),
                     help="SRC's format, converted into a samba-lm saved model at --out: "
                          + "; ".join(f"{k}: {v}" for k, v in CONVERT_FORMATS.items()))
    way.add_argument("--to", dest="to_format", choices=list(CONVERT_FORMATS),
                     help="convert the samba-lm model at SRC into this format at --out (official: a .pth file)")
    p.add_argument("--out", required=True, help="the directory (or, for --to official, the .pth file) to write")
    p.add_argument("--config", help="official only: the official config name (e.g. Samba_421M); default: read "
                                    "from the checkpoint (from) or matched to the model's shape (to)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a training checkpoint as one safetensors model")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a run directory (its newest)")
    p.add_argument("--out", required=True, help="the directory to write config.json, model.safetensors and "
                                                "tokenizer.json into")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.argv = sys.argv if argv is None else ["samba-lm", *argv]  # the command that result files record
    command = " ".join(["samba-lm", args.command] + ([args.evaluation] if args.command == "eval" else []))
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{command}: error: {e}") from None
    except OSError as e:
        if not _from_the_file_system(e):
            raise
        raise SystemExit(f"{command}: error: {e.strerror}: {e.filename}") from None
    except KeyboardInterrupt as e:  # Ctrl-C or, in train, SIGTERM: no traceback
        from .train.signals import Interrupted

        message = str(e) if isinstance(e, Interrupted) else "interrupted"
        if message:  # the other ranks of a distributed run stay quiet
            print(f"\n{command}: {message}", file=sys.stderr, flush=True)
        raise SystemExit(128 + getattr(e, "signum", signal.SIGINT)) from None


def _from_the_file_system(e: OSError) -> bool:
    """An OSError that says what is wrong with a path the user gave (permissions, a full disk, a file
    where a directory should be), rather than a fault in this program."""
    return e.filename is not None or e.errno in (errno.ENOSPC, errno.EDQUOT)


if __name__ == "__main__":
    main()
