"""TrainConfig: the single source of truth for a run. YAML files and CLI flags map onto its fields
one to one (`--lr 3e-4` <-> `lr: 3e-4`) and add no keys of their own."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..config import PRESETS, SambaConfig, check_field_names
from ..options import DEVICE_HELP, ListOption, format_default, json_object
from .distributed import PARALLEL_MODES

DTYPES = ("auto", "fp32", "bf16")
TASKS = ("lm", "passkey")
PACKING = ("concat", "documents")


def option(default, help: str):
    """A TrainConfig field: its default and the help of its flag, in one place."""
    if callable(default):  # a mutable default (dict) is made afresh for each config
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Defaults: the README's main job, `tiny` on Shakespeare, about six minutes on two CPU cores."""

    # the model
    model: str = option("tiny", f"preset to train: {', '.join(PRESETS)}")
    model_args: dict = option(dict, "SambaConfig fields over the preset, as a JSON object such as "
                                    """'{"d_model": 512}'; vocab_size defaults to the tokenizer's""")
    init_from: str = option("", "fine-tune this model (a saved model, a training checkpoint or a run directory) "
                                "instead of a fresh --model; its config and tokenizer come with it")
    # the data
    task: str = option("lm", "lm: next-token prediction on --data; passkey: the paper's passkey fine-tuning, "
                             "prompts made on the fly with the tokenizer of --init-from")
    data: str = option("data/shakespeare", "a shard directory written by `samba-lm data` (task lm)")
    pack: str = option("concat", "concat: blocks cut from the documents concatenated, each seeing what came "
                                 "before it (the paper's); documents: the same blocks, each document seeing "
                                 "only itself (the state resets after every EOS; task lm)")
    seq_len: int = option(256, "tokens per training sequence")
    batch_size: int = option(8, "sequences per optimizer step, over all processes")
    micro_batch_size: int = option(0, "sequences per forward pass and process (gradient accumulation); "
                                      "0: batch-size / processes, no accumulation")
    steps: int = option(200, "optimizer steps of the whole run (a resumed run continues up to this many)")
    # AdamW, warmup then cosine decay to lr * min_lr_ratio, clipping (paper recipe)
    lr: float = option(2e-3, "peak learning rate")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at lr times this")
    warmup_fraction: float = option(0.01, "fraction of the steps that warm the learning rate up linearly")
    weight_decay: float = option(0.1, "AdamW weight decay")
    betas: tuple = option((0.9, 0.95), "AdamW betas, comma-separated")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "clip the gradient norm at this; 0: no clipping")
    exempt_from_decay: bool = option(False, "no weight decay on norms, biases, A_log and D")
    # execution
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", "auto: bf16 autocast with fp32 master weights on CUDA, fp32 on a CPU; "
                                "or fp32, bf16")
    parallel: str = option("ddp", "under torchrun: ddp, or fsdp (FSDP2, one shard unit per sub-layer)")
    compile: bool = option(False, "torch.compile every sub-layer")
    activation_checkpointing: bool = option(False, "keep only each sub-layer's inputs for the backward and "
                                                   "recompute its activations there: less memory, the same "
                                                   "losses, one more forward per sub-layer")
    recompute_mamba: bool = option(False, "keep only each Mamba mixer's input (xz) for the backward and run "
                                          "its conv, projections and scan again there: about a third of "
                                          "the Mamba layer's saved bytes, one more scan forward per layer")
    seed: int = option(0, "seed of the initialisation and of the data order")
    # evaluation, logging, checkpoints
    eval_every: int = option(50, "steps between validation losses")
    eval_batches: int = option(4, "validation micro-batches per evaluation; 0: no validation")
    log_every: int = option(10, "steps between log lines")
    save_every: int = option(100, "steps between checkpoints (also written at the last step and on "
                                  "Ctrl-C or SIGTERM)")
    keep_last: int = option(2, "how many of the newest checkpoints are kept")
    out_dir: str = option("runs/default", "the run directory: checkpoints, metrics, loss.png and model/")
    resume: bool = option(True, "continue from the newest intact checkpoint in out-dir/checkpoints, if any")
    tensorboard: bool = option(True, "log to out-dir/tensorboard as well as metrics.jsonl")
    progress: bool = option(True, "show a progress bar (else log lines only)")

    def __post_init__(self):
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        for f in dataclasses.fields(self):  # YAML 1.1 reads 3e-4 as a string (it wants 3.0e-4)
            value = getattr(self, f.name)
            if f.type == "float" and isinstance(value, str) and _is_number(value):
                setattr(self, f.name, float(value))
        self.validate()

    def validate(self):
        def need(ok, name, rule):
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {rule}")

        for f in dataclasses.fields(self):  # the types first: the rules below compare values
            need(_has_type(getattr(self, f.name), f.type), f.name, f"must be {FIELD_TYPES[f.type][1]}")
        need(self.model in PRESETS, "model", f"must be a preset: {', '.join(PRESETS)}")
        try:
            check_field_names(SambaConfig, self.model_args)
        except ValueError as e:
            need(False, "model_args", str(e))
        for name in ("seq_len", "batch_size", "steps", "eval_every", "log_every", "save_every", "keep_last"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive int")
        need(isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 0, "micro_batch_size",
             "must be an int >= 0 (0: no accumulation)")
        need(isinstance(self.eval_batches, int) and self.eval_batches >= 0, "eval_batches", "must be an int >= 0")
        need(self.lr > 0, "lr", "must be positive")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must lie in [0, 1]")
        need(0 <= self.warmup_fraction < 1, "warmup_fraction", "must lie in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(len(self.betas) == 2 and all(_has_type(b, "float") and 0 <= b < 1 for b in self.betas), "betas",
             "must be two numbers in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0: no clipping)")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.parallel in PARALLEL_MODES, "parallel", f"must be one of {PARALLEL_MODES}")
        need(self.task in TASKS, "task", f"must be one of {TASKS}")
        need(self.pack in PACKING, "pack", f"must be one of {PACKING}")
        need(self.pack == "concat" or self.task == "lm", "pack",
             "documents packs the lm task's shards; the passkey task makes one prompt per sequence")
        need(self.task != "passkey" or self.init_from, "init_from",
             "the passkey task fine-tunes a model: give a saved model, a training checkpoint or a run directory")
        need(not (self.init_from and self.model_args), "model_args",
             "cannot be combined with init_from, which brings its own model config")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


FIELD_TYPES = {"int": (int, "an int"), "float": ((int, float), "a number"), "str": (str, "a string"),
               "bool": (bool, "true or false"), "dict": (dict, "a mapping"), "tuple": ((tuple, list), "a list")}


def _has_type(value, name: str) -> bool:
    types = FIELD_TYPES[name][0]
    return isinstance(value, types) and (name == "bool" or not isinstance(value, bool))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file: expected YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path} is not valid YAML ({getattr(e, 'problem', None) or e}{where})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of TrainConfig fields at the top level")
    return values


def make_config(values: dict) -> TrainConfig:
    check_field_names(TrainConfig, values)
    return TrainConfig(**values)


def add_arguments(parser: argparse.ArgumentParser):
    """One flag per TrainConfig field, with the field's help and default, plus --config FILE.yaml.
    Every flag defaults to None, so that only the flags given override the file."""
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file of TrainConfig fields (the flags' names with _); flags given override it")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = dict(dest=f.name, default=None, help=f"{f.metadata['help']} (default: {_shown(flag, default)})")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, dict):
            parser.add_argument(flag, type=json_object, metavar="JSON", **kwargs)
        elif isinstance(default, tuple):
            parser.add_argument(flag, action=ListOption, item=float, count=len(default), metavar="B1,B2", **kwargs)
        else:
            parser.add_argument(flag, type=type(default), **kwargs)


def _shown(flag: str, default) -> str:
    """A default as it is typed: --resume or --no-resume, 0.9,0.95, or none."""
    if isinstance(default, bool):
        return flag if default else "--no-" + flag[2:]
    return format_default(default) if default not in ("", {}) else "none"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = load_yaml(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return make_config(values)
