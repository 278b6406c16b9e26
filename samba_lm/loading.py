"""Loading a model for inference, and the run-directory layout, which only this module spells out.

A run directory is what `samba-lm train --out-dir RUN` writes:

    RUN/tokenizer.json        the tokenizer the token ids come from
    RUN/train_config.json     the resolved training and model configs (it marks the directory as a run)
    RUN/checkpoints/step_*/   training checkpoints (checkpoint.py writes and reads them)
    RUN/model/                at the end: the exported model, config.json + model.safetensors + tokenizer.json

`load_for_inference` takes any of a saved model, a training checkpoint or a run directory, so that the
CLI, the evaluations and the server load the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CONFIG_FILE, META_FILE, list_checkpoints, load_pretrained, model_from_training_checkpoint
from .data.tokenizer import load_tokenizer
from .model import SambaLM
from .options import first_line

TOKENIZER_FILE = "tokenizer.json"  # at a run's top, and beside an exported model's config.json
GENERATION_CONFIG_FILE = "generation_config.json"  # a Hugging Face checkpoint's: its end-of-turn tokens
# What travels with tokenizer.json when a Hugging Face checkpoint is converted: the chat template
# (tokenizer_config.json, or chat_template.jinja) and the end-of-turn tokens.
TOKENIZER_SIDE_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "chat_template.jinja", GENERATION_CONFIG_FILE)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class RunDir:
    """Where each part of a run lives under `root`."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER_FILE

    @property
    def train_config(self) -> Path:
        return self.root / "train_config.json"

    def newest_checkpoint(self) -> Path | None:
        found = list_checkpoints(self.checkpoints)
        return found[-1] if found else None

    @classmethod
    def holding(cls, path: str | os.PathLike) -> RunDir | None:
        """The run whose model/ or checkpoints/step_*/ `path` is, or None. A run is recognised by its
        train_config.json, so that a model saved elsewhere never picks up an unrelated tokenizer.json."""
        path = Path(path)
        for run in (cls(path.parent), cls(path.parent.parent)):
            if run.train_config.is_file() and (path == run.model or path.parent == run.checkpoints):
                return run
        return None


def resolve_model_dir(path: str | os.PathLike) -> tuple[Path, str]:
    """What a user may point at: a saved model, a training checkpoint, or a run directory (its
    exported model/, else its newest checkpoint). Returns (path, "model" | "checkpoint")."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path, "model"
    if (path / META_FILE).is_file():
        return path, "checkpoint"
    run = RunDir(path)
    if (run.model / CONFIG_FILE).is_file():
        return run.model, "model"
    newest = run.newest_checkpoint()
    if newest is not None:
        return newest, "checkpoint"
    raise FileNotFoundError(f"{path} is neither a saved model ({CONFIG_FILE}), a training checkpoint "
                            f"({META_FILE}) nor a run directory holding model/ or checkpoints/")


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A training checkpoint, or the newest one of a run directory (what `samba-lm export` reads)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    newest = RunDir(path).newest_checkpoint()
    if newest is None:
        raise FileNotFoundError(f"{path} is neither a training checkpoint ({META_FILE}) nor a run directory "
                                f"with checkpoints/")
    return newest


def find_tokenizer(where: str | os.PathLike) -> Path | None:
    """The tokenizer.json beside a model or checkpoint, else the one at the top of its run, else None."""
    where = Path(where)
    if (where / TOKENIZER_FILE).is_file():
        return where / TOKENIZER_FILE
    run = RunDir.holding(where)
    return run.tokenizer if run is not None and run.tokenizer.is_file() else None


def check_dtype(dtype) -> torch.dtype | None:
    """None, a floating-point torch.dtype, or its name ("bfloat16"), as a torch.dtype (or None)."""
    value = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(f"dtype must be None, a floating-point torch.dtype or one of {', '.join(DTYPES)}, "
                         f"got {dtype!r}")
    return value


def load_model_and_tokenizer_path(path: str | os.PathLike, device=None, dtype=None) -> tuple[SambaLM, Path | None]:
    """The model at a saved model, a training checkpoint or a run directory, its floating-point weights
    cast to `dtype` if given, and its tokenizer.json (see find_tokenizer; None if there is none)."""
    dtype = check_dtype(dtype)  # before the weights are read
    where, kind = resolve_model_dir(path)
    if kind == "model":
        model = load_pretrained(where, device=device, dtype=dtype)
    else:
        model = model_from_training_checkpoint(where, device)
        model = model.to(dtype) if dtype is not None else model
    return model, find_tokenizer(where)


def load_for_inference(path: str | os.PathLike, device=None, dtype=None):
    """(model in eval mode, tokenizer or None) from a saved model, a training checkpoint or a run
    directory: what `samba-lm generate`, the evaluations and the server load. `dtype` (e.g.
    torch.bfloat16) casts the floating-point weights."""
    model, tokenizer = load_model_and_tokenizer_path(path, device, dtype)
    return model.eval(), load_tokenizer(tokenizer) if tokenizer is not None else None


def load_for_generation(path: str | os.PathLike, device=None, dtype=None):
    """(model in eval mode, tokenizer, the tokenizer's directory) for the commands that encode prompts
    (`samba-lm generate`, the server): as load_for_inference, but a missing tokenizer.json is an error.
    The directory is where a Hugging Face checkpoint keeps its chat template and generation_config.json."""
    model, tokenizer = load_model_and_tokenizer_path(path, device, dtype)
    if tokenizer is None:
        raise _no_tokenizer(path)
    return model.eval(), load_tokenizer(tokenizer), tokenizer.parent


def load_tokenizer_for_generation(path: str | os.PathLike):
    """(tokenizer, its directory) of the model at `path`, without reading the weights: what the
    server's HTTP process needs when the model runs in an engine process. FileNotFoundError as
    load_for_generation's for a missing model or tokenizer.json."""
    where, _ = resolve_model_dir(path)
    tokenizer = find_tokenizer(where)
    if tokenizer is None:
        raise _no_tokenizer(path)
    return load_tokenizer(tokenizer), tokenizer.parent


def _no_tokenizer(path) -> FileNotFoundError:
    return FileNotFoundError(f"no tokenizer.json beside {path} or at the top of its run: the prompts cannot be encoded")


def resolve_device(name: str | None) -> torch.device:
    """'auto' (or None): CUDA when available, else the CPU; otherwise a device this machine has."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        _check_cuda(name, device)
    else:
        try:  # any other backend: one empty tensor says whether it works here
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError, ImportError) as e:
            why = first_line(e).split(". ")[0][:120]  # backends explain at length
            raise ValueError(f"--device {name} is not available here ({why}); use --device cpu or auto") from None
    return device


def _check_cuda(name: str, device: torch.device):
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {name}: CUDA is not available on this machine ({why}); "
                         f"use --device cpu, or auto to take a GPU when there is one")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def stop_token_ids(directory: str | os.PathLike) -> tuple[int, ...]:
    """The eos_token_id of generation_config.json in `directory` (an int or a list: Phi-4's assistant
    turns end at <|end|>, its text at <|endoftext|>), or () without one."""
    path = Path(directory) / GENERATION_CONFIG_FILE
    ids = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
    ids = [ids] if isinstance(ids, int) else ids or []
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {ids!r}")
    return tuple(ids)
