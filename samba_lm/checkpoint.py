"""Saved models (a directory holding config.json and model.safetensors) and training checkpoints.

Loading builds the model on the meta device and assigns the stored tensors, so nothing is
initialised twice; every way a checkpoint can be wrong ends in an error that says which.
Where these sit in a run directory, and loading a model for inference, is loading.py's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .config import SambaConfig
from .model import SambaLM
from .options import first_line
from .weights import read_safetensors

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
    os.chmod(tmp, 0o644)  # the safetensors writer leaves 0600: a model is for others to read too
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
    """Load a model written by save_pretrained, or a Hugging Face Phi-4-mini-flash directory
    (`convert.phi4flash`); `dtype` casts floating-point weights."""
    from .convert.phi4flash import from_phi4flash, is_phi4flash

    if is_phi4flash(path):
        return from_phi4flash(path, device, dtype)
    config = load_config(path)
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path}")
    try:
        tensors = read_safetensors(file, device)
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


# ---------------------------------------------------------------------------------------------
# Training checkpoints: `root/step_00000100/` holds the tensors of every stateful thing (sharded
# with torch.distributed.checkpoint, so FSDP ranks write their own shards), one small file of
# per-rank values per rank (RNG states), and meta.json. Everything is written under a `.tmp` name
# first; the rename is the commit, so a crash mid-save leaves the previous checkpoint intact.
# meta.json lists the size of every other file, so that a checkpoint damaged later (truncated by a
# full disk or a copy cut short) is recognised before it is read.

STEP_PREFIX = "step_"
META_FILE = "meta.json"


@contextlib.contextmanager
def _single_process_quiet():
    """torch.distributed.checkpoint warns that it runs in a single process even when told so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def save_checkpoint(root: str | os.PathLike, step: int, tensors: dict, per_rank: dict, meta: dict) -> Path:
    """Collective: every rank calls it. `tensors` may hold DTensors (sharded state)."""
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final = root / f"{STEP_PREFIX}{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with _single_process_quiet():
        dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not torch.distributed.is_initialized())
    torch.save(per_rank, tmp / f"rank{_rank():05d}.pt")
    _barrier()
    if _is_main():
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        (tmp / META_FILE).write_text(json.dumps({"step": step, **meta, "files": files}, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    _barrier()
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Committed checkpoints, oldest first (a `.tmp` directory is an interrupted save)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
             and p.name[len(STEP_PREFIX):].isdigit() and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    file = Path(path) / META_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {META_FILE})")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {path} is damaged: {file} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise ValueError(f"checkpoint {path} is damaged: {file} records no step")
    return meta


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """meta.json of the checkpoint at `path`, after checking that every file it lists is there with
    the size it was written with; ValueError naming the first file that is not."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    # Checkpoints written before meta.json listed the files: at least the tensors' index must be there.
    expected = meta.get("files", {".metadata": None})
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"checkpoint {path} is damaged: {file} is missing")
        if size is not None and file.stat().st_size != size:
            raise ValueError(f"checkpoint {path} is damaged: {file} holds {file.stat().st_size:,} bytes, "
                             f"{size:,} when it was written")
    return meta


def newest_intact_checkpoint(root: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest committed checkpoint under `root` that verifies (or None), and why each newer one
    was passed over."""
    passed_over = []
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except ValueError as e:
            passed_over.append(str(e))
            continue
        return path, passed_over
    return None, passed_over


def _read_tensors(path: Path, tensors: dict) -> None:
    """dcp.load into `tensors`; a checkpoint that cannot be read is a one-line ValueError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process_quiet():
            dcp.load(tensors, checkpoint_id=str(path), no_dist=not torch.distributed.is_initialized())
    except (CheckpointException, RuntimeError, OSError, EOFError) as e:
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {first_line(e)}); "
                         f"it is damaged or not a samba-lm checkpoint") from None


def load_checkpoint(path: str | os.PathLike, tensors: dict) -> tuple[dict, dict | None]:
    """Fill `tensors` in place from a checkpoint; returns (meta, this rank's per-rank values or None
    when the checkpoint was written by fewer ranks)."""
    path = Path(path)
    meta = verify_checkpoint(path)
    _read_tensors(path, tensors)
    rank_file = path / f"rank{_rank():05d}.pt"
    per_rank = torch.load(rank_file, weights_only=False) if rank_file.is_file() else None
    return meta, per_rank


def prune_checkpoints(root: str | os.PathLike, keep: int):
    """Keep the newest `keep` committed checkpoints; drop stale `.tmp` directories. Main rank only."""
    if not _is_main():
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in Path(root).glob(f"{STEP_PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def model_from_training_checkpoint(path: str | os.PathLike, device=None) -> SambaLM:
    """Rebuild the full model from a (possibly sharded) training checkpoint, in one process."""
    meta = verify_checkpoint(path)
    with torch.device("meta"):
        model = SambaLM(SambaConfig.from_dict(meta["model_config"]))
    model.to_empty(device=device or "cpu")
    state = {"model": model.state_dict()}
    _read_tensors(Path(path), state)
    model.load_state_dict(state["model"])
    return model
