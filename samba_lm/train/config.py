"""TrainConfig: the single source of truth for a run. YAML files and CLI flags map onto its fields
one to one (`--lr 3e-4` <-> `lr: 3e-4`) and add no keys of their own."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import PRESETS
from .distributed import PARALLEL_MODES

DTYPES = ("auto", "fp32", "bf16")
TASKS = ("lm", "passkey")


@dataclass
class TrainConfig:
    """Defaults: the README's main job, `tiny` on Shakespeare, about six minutes on two CPU cores."""

    # model: a preset plus SambaConfig overrides; vocab_size defaults to the tokenizer's
    model: str = "tiny"
    model_args: dict = field(default_factory=dict)
    # fine-tuning: start from this model's weights (a saved model, a training checkpoint or a run
    # directory) instead of a fresh `model`; its config and tokenizer come with it
    init_from: str = ""
    # task: "lm" (next-token prediction on `data`, a directory written by `samba-lm data`) or "passkey"
    # (the paper's passkey fine-tuning: prompts made on the fly with the tokenizer of init_from)
    task: str = "lm"
    data: str = "data/shakespeare"
    seq_len: int = 256
    # batch: sequences per optimizer step over all processes; micro_batch_size per forward pass
    batch_size: int = 8
    micro_batch_size: int = 0  # 0: batch_size / world_size (no accumulation)
    steps: int = 200
    # AdamW, warmup then cosine decay to lr * min_lr_ratio, clipping (paper recipe)
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.01
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    exempt_from_decay: bool = False  # True: no weight decay on norms, biases, A_log and D
    # execution
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast with fp32 master weights on CUDA, fp32 on CPU
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2, one shard unit per sub-layer)
    compile: bool = False
    seed: int = 0
    # evaluation, logging, checkpoints
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 2
    out_dir: str = "runs/default"
    resume: bool = True  # continue from the newest checkpoint in out_dir/checkpoints if any
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self):
        def need(ok, name, rule):
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {rule}")

        need(self.model in PRESETS, "model", f"must be a preset: {', '.join(PRESETS)}")
        need(isinstance(self.model_args, dict), "model_args", "must be a mapping of SambaConfig fields")
        for name in ("seq_len", "batch_size", "steps", "eval_every", "log_every", "save_every", "keep_last"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive int")
        need(isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 0, "micro_batch_size",
             "must be an int >= 0 (0: no accumulation)")
        need(isinstance(self.eval_batches, int) and self.eval_batches >= 0, "eval_batches", "must be an int >= 0")
        need(self.lr > 0, "lr", "must be positive")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must lie in [0, 1]")
        need(0 <= self.warmup_fraction < 1, "warmup_fraction", "must lie in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0: no clipping)")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.parallel in PARALLEL_MODES, "parallel", f"must be one of {PARALLEL_MODES}")
        need(self.task in TASKS, "task", f"must be one of {TASKS}")
        need(self.task != "passkey" or self.init_from, "init_from",
             "the passkey task fine-tunes a model: give a saved model, a training checkpoint or a run directory")
        need(not (self.init_from and self.model_args), "model_args",
             "cannot be combined with init_from, which brings its own model config")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of TrainConfig fields at the top level")
    return values


def make_config(values: dict) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown TrainConfig fields {unknown}; valid fields: {sorted(known)}")
    return TrainConfig(**values)


def add_arguments(parser: argparse.ArgumentParser):
    """One flag per TrainConfig field, plus --config FILE.yaml (flags override the file)."""
    parser.add_argument("--config", help="YAML file of TrainConfig fields")
    for f in dataclasses.fields(TrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(default, dict):
            parser.add_argument(flag, dest=f.name, type=json.loads, default=None, metavar="JSON")
        elif isinstance(default, tuple):
            parser.add_argument(flag, dest=f.name, type=float, nargs=len(default), default=None)
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=None)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = load_yaml(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return make_config(values)
