"""Saved models: a directory holding config.json and model.safetensors.

Loading builds the model on the meta device and assigns the stored tensors, so nothing is
initialised twice; every way a checkpoint can be wrong ends in an error that says which.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import SambaConfig
from .model import SambaLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "samba-lm/1"


def save_pretrained(model: SambaLM, path: str | os.PathLike) -> Path:
    """Write `path/config.json` and `path/model.safetensors` (each via a temp file and a rename)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, path / WEIGHTS_FILE)
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **model.config.to_dict()}, indent=2) + "\n")
    os.replace(tmp, path / CONFIG_FILE)
    return path


def load_config(path: str | os.PathLike) -> SambaConfig:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}: not a saved samba-lm model directory")
    try:
        values = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from e
    if values.pop("format", None) != FORMAT:
        raise ValueError(f"{file} is not a {FORMAT} config")
    return SambaConfig.from_dict(values)


def load_pretrained(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> SambaLM:
    """Load a model written by save_pretrained; `dtype` casts floating-point weights."""
    config = load_config(path)
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path}")
    try:
        tensors = load_file(str(file), device=str(device or "cpu"))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file} is corrupt or truncated: {e}") from e
    with torch.device("meta"):
        model = SambaLM(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(n for n in set(expected) & set(tensors) if tuple(tensors[n].shape) != tuple(expected[n]))
    if missing or unexpected or wrong:
        raise ValueError(f"{file} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    if dtype is not None:
        tensors = {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}
    model.load_state_dict(tensors, assign=True)
    return model
