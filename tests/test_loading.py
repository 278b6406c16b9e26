"""loading.py: what a user may point at (a saved model, a checkpoint, a run directory), where the
tokenizer is found, load_for_inference with a dtype, resolve_device's errors; and that nothing in
the library imports the CLI."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import samba_lm
from samba_lm.checkpoint import save_checkpoint
from samba_lm.data import train_tokenizer
from samba_lm.loading import (RunDir, find_tokenizer, load_for_inference, resolve_checkpoint_dir, resolve_device,
                              resolve_model_dir)

from conftest import small_model

PACKAGE = Path(samba_lm.__file__).parent


@pytest.fixture
def run(tmp_path) -> RunDir:
    """A run as the trainer leaves one: tokenizer.json, train_config.json, checkpoints at steps 1 and 2, model/."""
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    train_tokenizer(["alpha beta gamma delta"] * 20, 300).save(str(run.tokenizer))
    run.train_config.write_text("{}\n")
    model = small_model(torch.float32)
    meta = {"model_config": model.config.to_dict()}
    for step in (1, 2):
        save_checkpoint(run.checkpoints, step, {"model": model.state_dict()}, {}, meta)
    samba_lm.save_pretrained(model, run.model)
    return run


def test_a_run_resolves_to_its_model_else_its_newest_checkpoint(run):
    newest = run.checkpoints / "step_00000002"
    assert run.newest_checkpoint() == newest
    assert resolve_model_dir(run.root) == (run.model, "model")
    assert resolve_model_dir(run.model) == (run.model, "model")
    assert resolve_model_dir(run.checkpoints / "step_00000001") == (run.checkpoints / "step_00000001", "checkpoint")
    assert resolve_checkpoint_dir(run.root) == newest  # export reads checkpoints, even beside a model/
    for model_file in run.model.iterdir():
        model_file.unlink()
    run.model.rmdir()
    assert resolve_model_dir(run.root) == (newest, "checkpoint")


def test_a_path_that_holds_no_model_is_named(run, tmp_path):
    for path in (tmp_path / "nowhere", run.checkpoints, tmp_path):
        with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(path))} is neither a saved model "
                                                    r"\(config.json\), a training checkpoint \(meta.json\) nor a run"):
            resolve_model_dir(path)
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(run.model))} is neither a training checkpoint"):
        resolve_checkpoint_dir(run.model)
    assert RunDir(tmp_path / "nowhere").newest_checkpoint() is None


def test_the_tokenizer_is_beside_the_model_else_at_the_top_of_its_run(run, tmp_path):
    checkpoint = run.newest_checkpoint()
    assert find_tokenizer(run.model) == find_tokenizer(checkpoint) == run.tokenizer
    (run.model / "tokenizer.json").write_bytes(run.tokenizer.read_bytes())
    assert find_tokenizer(run.model) == run.model / "tokenizer.json"
    run.train_config.unlink()  # no longer a run: a model saved at x/model ignores x/tokenizer.json
    assert find_tokenizer(checkpoint) is None
    alone = tmp_path / "alone"
    samba_lm.save_pretrained(small_model(), alone)
    (tmp_path / "tokenizer.json").write_bytes(run.tokenizer.read_bytes())
    assert find_tokenizer(alone) is None


@pytest.mark.parametrize("kind", ["model", "checkpoint"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16"])
def test_load_for_inference_casts_the_weights(run, kind, dtype):
    path = run.model if kind == "model" else run.newest_checkpoint()
    reference, _ = load_for_inference(path)
    model, tokenizer = load_for_inference(path, dtype=dtype)
    want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert not model.training and tokenizer.get_vocab() == samba_lm.data.load_tokenizer(run.tokenizer).get_vocab()
    assert {p.dtype for p in reference.parameters()} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {want}
    a, b = reference.state_dict(), model.state_dict()
    assert all(torch.equal(a[k].to(want), b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "bf16", 16])
def test_a_bad_dtype_fails_before_anything_is_read(tmp_path, dtype):
    with pytest.raises(ValueError, match=r"dtype must be None, a floating-point torch.dtype or one of float32, "
                                         rf"bfloat16, float16, float64, got {dtype!r}"):
        load_for_inference(tmp_path / "nowhere", dtype=dtype)


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("gpu", "cuda:x", 3.5):
        with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N, got"):
            resolve_device(name)
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match=r"--device mps is not available here \(.*\); use --device cpu or auto"):
            resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device cuda:0: CUDA is not available on this machine \(.*\); use "
                                         "--device cpu, or auto"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


# ----------------------------------------------------------------------------- nothing imports the CLI
def imported_modules(path: Path, root: Path) -> set[str]:
    """Every module that the file at `path` (under the directory `root` of its top package) imports,
    anywhere in it, function bodies included, as absolute names."""
    parts = path.relative_to(root).with_suffix("").parts
    package = parts[:-1]  # the package a relative import starts from (of an __init__ too)
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            start = package[:len(package) - node.level + 1] if node.level else ()
            base = ".".join((*start, *([node.module] if node.module else [])))
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}  # `from . import cli` too
    return names


def test_the_import_walk_finds_imports_of_the_cli(tmp_path):
    (tmp_path / "samba_lm" / "eval").mkdir(parents=True)
    for source in ("def f():\n    from ..cli import main\n", "from .. import cli\n", "import samba_lm.cli\n",
                   "from samba_lm.cli import build_parser\n"):
        file = tmp_path / "samba_lm" / "eval" / "x.py"
        file.write_text(source)
        assert "samba_lm.cli" in imported_modules(file, tmp_path), source
    file.write_text("from ..options import ListOption\nfrom .. import loading\n")
    assert "samba_lm.cli" not in imported_modules(file, tmp_path)


def test_no_library_module_imports_the_cli():
    entry_points = {PACKAGE / "cli.py", PACKAGE / "__main__.py"}
    importers = [str(f.relative_to(PACKAGE.parent)) for f in sorted(PACKAGE.rglob("*.py"))
                 if f not in entry_points and "samba_lm.cli" in imported_modules(f, PACKAGE.parent)]
    assert importers == [], f"library modules must not import samba_lm.cli: {importers}"


def test_every_module_imports_in_a_fresh_interpreter_without_the_cli():
    script = ("import importlib, json, pkgutil, sys, samba_lm\n"
              "names = [m.name for m in pkgutil.walk_packages(samba_lm.__path__, 'samba_lm.')\n"
              "         if m.name not in ('samba_lm.cli', 'samba_lm.__main__')]\n"
              "for name in names:\n"
              "    importlib.import_module(name)\n"
              "print(json.dumps({'imported': len(names), 'cli': 'samba_lm.cli' in sys.modules}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["imported"] > 20 and not result["cli"], result
