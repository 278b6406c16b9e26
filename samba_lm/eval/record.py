"""What every evaluation result records: the model config, a hash of its weights, the command, versions."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

import torch


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the parameters and buffers (names, shapes, dtypes and bytes), in name order: the same
    weights give the same hash whether they were loaded from a saved model or a training checkpoint."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_record(model: torch.nn.Module, model_path: str | os.PathLike | None = None, argv: list[str] | None = None) -> dict:
    """The provenance block of a result file."""
    import samba_lm

    argv = sys.argv if argv is None else argv
    return {
        "command": shlex.join(["samba-lm" if Path(argv[0]).name in ("samba-lm", "cli.py") else argv[0], *argv[1:]]),
        "model_path": str(model_path) if model_path is not None else None,
        "weights_sha256": weights_sha256(model),
        "config": dataclasses.asdict(model.config),
        "samba_lm": samba_lm.__version__,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write atomically (a crash leaves the previous file or none, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    return path


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None (and a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'samba-lm[train]')")
        return None
    return plt
